"""LoraConfig: the adapter's hyper-parameters, with PEFT's field names, defaults and JSON form.

One dataclass serves the functional core (``lorakit.inject.add_adapter``), the PEFT-style facade
(``lorakit.LoraConfig``) and ``adapter_config.json``. Field names and defaults are PEFT's
(REFERENCE.md, "PEFT adapter format"), so a config written here is read by PEFT and the other way
round. Values are checked in ``__post_init__``; a wrong type or value is a :class:`LorakitError`
naming the field.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

CONFIG_NAME = "adapter_config.json"

# Fields PEFT 0.21 writes that lorakit does not use; written with PEFT's values so our JSON is key
# for key what PEFT writes, and accepted on load only at these (neutral) values.
_PEFT_NEUTRAL_FIELDS: dict[str, Any] = {
    "alora_invocation_tokens": None,
    "arrow_config": None,
    "auto_mapping": None,
    "corda_config": None,
    "ensure_weight_tying": False,
    "eva_config": None,
    "kasa_config": None,
    "layer_replication": None,
    "loftq_config": {},
    "lora_ga_config": None,
    "megatron_config": None,
    "megatron_core": "megatron.core",
    "monteclora_config": None,
    "qalora_group_size": 16,
    "revision": None,
    "trainable_token_indices": None,
    "use_bdlora": None,
    "use_qalora": False,
    "velora_config": None,
}
# Of those, the ones that change what the adapter computes: refused unless neutral.
_UNSUPPORTED_IF_SET = (
    "alora_invocation_tokens", "arrow_config", "kasa_config", "layer_replication",
    "monteclora_config", "trainable_token_indices", "use_bdlora",
    "use_qalora", "velora_config",
)
_INIT_CHOICES = (True, False, "gaussian", "kaiming")
_BIAS_CHOICES = ("none", "all", "lora_only")


@dataclass
class LoraConfig:
    """Hyper-parameters of one LoRA adapter, as PEFT names them."""

    r: int = 8
    """Rank of the update ``B A``."""
    lora_alpha: float = 8
    """Scale numerator: the update is multiplied by ``alpha/r`` (``alpha/sqrt(r)`` with rsLoRA)."""
    target_modules: list[str] | str | None = None
    """Module names (exact or dotted suffix), a full-match regex string, or ``"all-linear"``."""
    exclude_modules: list[str] | str | None = None
    """Names or a regex of modules never to adapt, even if targeted."""
    target_parameters: list[str] | None = None
    """Parameters to adapt directly (PEFT's ``target_parameters``): names or dotted suffixes of
    parameters, e.g. ``mlp.experts.gate_up_proj`` — a mixture-of-experts layer's 3-D expert weights
    (LoRA per expert, on routed tokens) or any 2-D weight such as a router's. Needs
    ``lora_dropout`` 0 there, as in PEFT; ``layers_to_transform`` and ``exclude_modules`` do not
    apply to them (as in PEFT)."""
    lora_dropout: float = 0.0
    """Dropout probability on the adapter branch's input (the base path is untouched)."""
    fan_in_fan_out: bool = False
    """True for layers that store (in, out) weights, such as transformers' ``Conv1D``."""
    bias: str = "none"
    """Which base biases train: ``none``, ``all`` biases, or ``lora_only`` (of adapted layers)."""
    use_rslora: bool = False
    """rsLoRA: scale by ``alpha/sqrt(r)`` instead of ``alpha/r``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full (a copy per adapter), e.g. a classification head."""
    init_lora_weights: bool | str = True
    """``True``/``"kaiming"`` (B = 0), ``"gaussian"`` (A ~ N(0, 1/r), B = 0) or ``False`` (random B)."""
    layers_to_transform: list[int] | int | None = None
    """Only adapt modules in these layer indices (needs a list of target names)."""
    layers_pattern: list[str] | str | None = None
    """Name of the layer list (e.g. ``layers``, ``h``) in which to read the layer index."""
    rank_pattern: dict[str, int] = field(default_factory=dict)
    """Per-module rank: key ``k`` applies to names matching ``(.*\\.)?(k)$``; first match wins."""
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    """Per-module alpha, matched like ``rank_pattern``."""
    lora_bias: bool = False
    """Give ``lora_B`` a trainable bias."""
    use_dora: bool = False
    """DoRA (weight-decomposed LoRA)."""
    base_model_name_or_path: str | None = None
    """Where the base model came from; filled in on save when known."""
    task_type: str | None = None
    """PEFT's task type (``CAUSAL_LM``, ``SEQ_CLS``, …); informational here."""
    inference_mode: bool = False
    """Written ``true`` on save, as PEFT does."""
    peft_type: str = "LORA"

    def __post_init__(self) -> None:
        _check_int("r", self.r, minimum=1)
        _check_number("lora_alpha", self.lora_alpha)
        _check_number("lora_dropout", self.lora_dropout)
        if not 0.0 <= self.lora_dropout < 1.0:
            raise LorakitError(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
        for name in ("fan_in_fan_out", "use_rslora", "lora_bias", "use_dora", "inference_mode"):
            if not isinstance(getattr(self, name), bool):
                raise LorakitError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.bias not in _BIAS_CHOICES:
            raise LorakitError(f"bias must be one of {', '.join(_BIAS_CHOICES)}; got {self.bias!r}")
        init = self.init_lora_weights
        # True == 1 in Python: refuse ints that only compare equal to the booleans.
        pissa = isinstance(init, str) and re.fullmatch(r"pissa(_niter_\d+)?", init)
        if not isinstance(init, (bool, str)) or (init not in _INIT_CHOICES and not pissa):
            raise LorakitError(
                "init_lora_weights must be true, false, 'kaiming', 'gaussian', 'pissa' or "
                f"'pissa_niter_<K>'; got {init!r}"
            )
        self.target_modules = _names_or_regex("target_modules", self.target_modules)
        self.exclude_modules = _names_or_regex("exclude_modules", self.exclude_modules)
        if self.target_parameters is not None:
            if isinstance(self.target_parameters, str):
                raise LorakitError("target_parameters must be a list of parameter names (e.g. "
                                   f"['mlp.experts.gate_up_proj']), not a string: got {self.target_parameters!r}")
            self.target_parameters = sorted(set(_str_list("target_parameters", self.target_parameters)))
        if self.modules_to_save is not None:
            self.modules_to_save = _str_list("modules_to_save", self.modules_to_save)
        if self.layers_to_transform is not None:
            layers = self.layers_to_transform
            layers = [layers] if isinstance(layers, int) and not isinstance(layers, bool) else layers
            if not isinstance(layers, (list, tuple)) or not all(
                isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in layers
            ):
                raise LorakitError(
                    f"layers_to_transform must be a layer index or a list of them, got {layers!r}"
                )
            self.layers_to_transform = list(layers)
            if isinstance(self.target_modules, str):
                raise LorakitError(
                    "layers_to_transform cannot be combined with a regex target_modules string; "
                    "put the layer indices in the regex, or give target_modules as a list"
                )
        if self.layers_pattern is not None:
            if isinstance(self.layers_pattern, str):
                self.layers_pattern = [self.layers_pattern]
            self.layers_pattern = _str_list("layers_pattern", self.layers_pattern)
            if self.layers_to_transform is None:
                raise LorakitError("layers_pattern only makes sense together with layers_to_transform")
        for name, pattern in (("rank_pattern", self.rank_pattern), ("alpha_pattern", self.alpha_pattern)):
            if not isinstance(pattern, dict) or not all(isinstance(k, str) for k in pattern):
                raise LorakitError(f"{name} must be a mapping of module-name pattern to number")
            for key, value in pattern.items():
                if name == "rank_pattern":
                    _check_int(f"rank_pattern[{key!r}]", value, minimum=1)
                else:
                    _check_number(f"alpha_pattern[{key!r}]", value)
        if self.peft_type != "LORA":
            raise LorakitError(f"peft_type {self.peft_type!r} is not a LoRA adapter (expected 'LORA')")

    # -- per-module values -------------------------------------------------------------------

    def rank_for(self, module_name: str) -> int:
        """The rank for ``module_name`` after ``rank_pattern``."""
        key = _pattern_key(self.rank_pattern, module_name)
        return self.rank_pattern[key] if key is not None else self.r

    def alpha_for(self, module_name: str) -> float:
        """The alpha for ``module_name`` after ``alpha_pattern``."""
        key = _pattern_key(self.alpha_pattern, module_name)
        return self.alpha_pattern[key] if key is not None else self.lora_alpha

    # -- JSON --------------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """PEFT's JSON form: every field PEFT writes, sets as lists."""
        data = {**_PEFT_NEUTRAL_FIELDS, **dataclasses.asdict(self)}
        for key in ("target_modules", "exclude_modules", "modules_to_save", "target_parameters"):
            if isinstance(data[key], (set, tuple)):
                data[key] = sorted(data[key])
        data["peft_version"] = _peft_version_written()
        return data

    def to_json(self) -> str:
        """``adapter_config.json``'s text as PEFT writes it: indent 2, keys sorted, inference mode."""
        data = self.to_dict()
        data["inference_mode"] = True
        return json.dumps(data, indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> LoraConfig:
        """Build from PEFT's JSON form; unknown PEFT-only fields must hold their neutral values."""
        if not isinstance(data, dict):
            raise LorakitError(f"{source}: expected a JSON object, got {type(data).__name__}")
        peft_type = data.get("peft_type")
        if peft_type is None:
            raise LorakitError(f"{source}: no 'peft_type' field; this is not a PEFT adapter config")
        if peft_type != "LORA":
            raise LorakitError(f"{source}: peft_type is {peft_type!r}; lorakit reads LoRA adapters ('LORA')")
        names = {f.name for f in dataclasses.fields(cls)}
        for key in _UNSUPPORTED_IF_SET:
            if key in data and data[key] not in (None, False, _PEFT_NEUTRAL_FIELDS[key]):
                raise LorakitError(
                    f"{source}: field {key!r} = {data[key]!r} is a PEFT feature lorakit does not "
                    "implement; this adapter cannot be loaded faithfully"
                )
        init = data.get("init_lora_weights", True)
        if isinstance(init, str) and init not in _INIT_CHOICES and not init.startswith("pissa"):
            # olora/loftq/eva… only change the initial values; the saved tensors are what count.
            # (PiSSA also changes the base weight, so it is kept: loading redoes it, as PEFT does.)
            data = {**data, "init_lora_weights": True}
        kwargs = {k: v for k, v in data.items() if k in names}
        try:
            return cls(**kwargs)
        except LorakitError as err:
            raise LorakitError(f"{source}: {err}") from None

    @classmethod
    def load(cls, folder: str | Path) -> LoraConfig:
        """Read ``adapter_config.json`` from ``folder``."""
        path = Path(folder) / CONFIG_NAME
        if not path.is_file():
            raise LorakitError(f"{path}: not found; an adapter folder holds {CONFIG_NAME}")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise LorakitError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
        return cls.from_dict(data, source=str(path))


def _pattern_key(pattern: dict[str, Any], module_name: str) -> str | None:
    for key in pattern:
        if re.match(rf"(.*\.)?({key})$", module_name):
            return key
    return None


def _peft_version_written() -> str:
    # PEFT records its own version; we record the PEFT format version we are compatible with.
    return "0.21.2"


def _check_int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LorakitError(f"{name} must be an integer >= {minimum}, got {value!r}")


def _check_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LorakitError(f"{name} must be a number, got {value!r}")


def _str_list(name: str, value: Any) -> list[str]:
    if isinstance(value, (list, tuple, set)) and all(isinstance(v, str) for v in value):
        return list(value)
    raise LorakitError(f"{name} must be a list of module names, got {value!r}")


def _names_or_regex(name: str, value: Any) -> list[str] | str | None:
    if value is None or value == "all-linear":
        return value
    if isinstance(value, str):
        try:
            re.compile(value)
        except re.error as err:
            raise LorakitError(f"{name} {value!r}: a string is a regular expression, and this one is invalid "
                               f"({err}); give a list of module names instead, or fix the pattern") from None
        return value
    return _str_list(name, value)
