"""The training config: one dataclass per YAML section, ``key=value`` overrides, strict checks.

```yaml
model: smollm2-135m-instruct     # RunConfig.model
data: {train: data.jsonl}         # DataConfig (lorakit.data.config)
adapter: {r: 16, alpha: 32}       # AdapterConfig
train: {epochs: 2, lr: 2.0e-4}    # TrainConfig
output: runs/my-run
```

Notable:

- Every section is a dataclass whose fields are the YAML keys; an unknown key anywhere is an
  error that names its path and suggests the closest known key ("did you mean").
- Numbers written the YAML 1.1 way that PyYAML reads as strings (``lr: 1e-4``) are accepted.
- ``key=value`` overrides use dotted paths (``train.lr=1e-3``, ``data.train=my.jsonl``); the value
  is parsed as YAML, so ``adapter.targets=[q_proj,v_proj]`` gives a list.
- :meth:`RunConfig.to_dict` gives the resolved config that is saved as ``config.yaml``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from lorakit._fs import atomic_write_text
from lorakit.adapters.config import LoraConfig
from lorakit.data.config import DataConfig
from lorakit.errors import LorakitError

ADAPTER_METHODS = ("lora", "dora", "qlora", "spectrum")
SCHEDULES = ("cosine", "linear", "constant")
REPORTERS = ("tensorboard", "wandb", "trackio")
DEVICES = ("auto", "cpu", "cuda", "mps")
DTYPES = ("auto", "fp32", "bf16")
DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class AdapterConfig:
    """The ``adapter:`` section: which adapter, its rank, scale and where it goes."""

    method: str = "lora"
    """``lora``, ``dora``, ``qlora`` (LoRA on an NF4 base), or ``spectrum`` (the selected matrices trained
    in full, everything else frozen; ``targets`` then names the matrices)."""
    r: int = 16
    """Rank of the update ``B A``."""
    alpha: float = 32
    """Scale numerator: the update is multiplied by ``alpha / r`` (``alpha / sqrt(r)`` with rslora)."""
    dropout: float = 0.05
    """Dropout on the adapter branch's input during training."""
    targets: list[str] | str = "all-linear"
    """``all-linear`` (every linear layer but the output head), a list of names, a regex, or
    ``spectrum:N``: the top N % of each module type by Spectrum's signal-to-noise ratio."""
    exclude: list[str] | str | None = None
    """Names or a regex of modules never to adapt."""
    target_parameters: list[str] | None = None
    """Parameters to adapt directly (PEFT's ``target_parameters``), e.g. a mixture-of-experts model's
    ``[mlp.experts.gate_up_proj, mlp.experts.down_proj]``: LoRA per expert, on the tokens routed to it."""
    rslora: bool = False
    """rsLoRA scaling ``alpha / sqrt(r)``."""
    init: str = "kaiming"
    """``kaiming`` (B = 0), ``gaussian`` (A ~ N(0, 1/r), B = 0) or ``pissa`` (W's principal part)."""
    quantize: str = "none"
    """Base weights: ``none``, or ``nf4`` (4-bit, double quant; implied by ``method: qlora``)."""
    bias: str = "none"
    """Base biases to train: ``none``, ``all`` or ``lora_only``."""
    modules_to_save: list[str] | None = None
    """Modules trained in full beside the adapter (e.g. a classification head)."""
    spectrum_embeddings: bool = True
    """With ``method: spectrum``: also train the input embeddings and the output head, as the
    reference Spectrum does."""

    def __post_init__(self) -> None:
        if self.method not in ADAPTER_METHODS:
            raise LorakitError(f"adapter.method: expected one of {', '.join(ADAPTER_METHODS)}, got {self.method!r}")
        _int("adapter.r", self.r, 1)
        self.alpha = _number("adapter.alpha", self.alpha)
        self.dropout = _number("adapter.dropout", self.dropout)
        if not 0.0 <= self.dropout < 1.0:
            raise LorakitError(f"adapter.dropout: expected a value in [0, 1), got {self.dropout}")
        if self.init not in ("kaiming", "gaussian", "pissa"):
            raise LorakitError(f"adapter.init: expected kaiming, gaussian or pissa, got {self.init!r}")
        if self.quantize not in ("none", "nf4"):
            raise LorakitError(f"adapter.quantize: expected none or nf4, got {self.quantize!r}")
        if self.init == "pissa" and self.quantized:
            raise LorakitError("adapter.init: pissa needs a dense base; it cannot be combined with an nf4 base")
        _bool("adapter.rslora", self.rslora)
        _bool("adapter.spectrum_embeddings", self.spectrum_embeddings)
        top = self.spectrum_top  # validates spectrum:N
        if self.target_parameters is not None and (not isinstance(self.target_parameters, list) or not all(
                isinstance(t, str) for t in self.target_parameters)):
            raise LorakitError("adapter.target_parameters: expected a list of parameter names, e.g. "
                               f"[mlp.experts.gate_up_proj, mlp.experts.down_proj]; got {self.target_parameters!r}")
        if self.method == "spectrum" and self.target_parameters:
            raise LorakitError("adapter.target_parameters: method: spectrum trains whole matrices; target_parameters "
                               "are for LoRA (method: lora)")
        if self.method == "spectrum":
            if self.quantized:
                raise LorakitError("adapter.method: spectrum trains full-precision weights; it cannot be combined "
                                   "with quantize: nf4 (use method: qlora with targets: spectrum:N instead)")
            if top is None and not isinstance(self.targets, list):
                raise LorakitError("adapter.targets: method: spectrum needs the matrices to train: spectrum:N (the "
                                   "top N % of each module type, e.g. spectrum:25) or the list that "
                                   "`lorakit spectrum MODEL --top N` prints")

    @property
    def quantized(self) -> bool:
        """Whether the base is stored in NF4 (``method: qlora`` or ``quantize: nf4``)."""
        return self.method == "qlora" or self.quantize == "nf4"

    @property
    def spectrum_top(self) -> float | None:
        """N of ``targets: spectrum:N``, or None for any other targets."""
        if not (isinstance(self.targets, str) and self.targets.startswith("spectrum:")):
            return None
        try:
            top = float(self.targets.removeprefix("spectrum:"))
        except ValueError:
            top = math.nan
        if not 0.0 < top <= 100.0:
            raise LorakitError(f"adapter.targets: {self.targets!r}: expected spectrum:N with N a percentage in "
                               "(0, 100], e.g. spectrum:25")
        return top

    def to_lora_config(self, base_model: str | None = None, targets: list[str] | str | None = None) -> LoraConfig:
        """The core library's ``LoraConfig`` (PEFT field names) for these settings.

        Args:
            base_model: recorded as ``base_model_name_or_path``.
            targets: the resolved target modules when ``targets`` is ``spectrum:N``.
        """
        if targets is None and self.spectrum_top is not None:
            raise LorakitError("adapter.targets: spectrum:N must be resolved against the model first "
                               "(lorakit.train.spectrum.resolve_targets)")
        try:
            return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets or self.targets,
                              exclude_modules=self.exclude, target_parameters=self.target_parameters,
                              use_rslora=self.rslora,
                              init_lora_weights=True if self.init == "kaiming" else self.init, bias=self.bias,
                              use_dora=self.method == "dora",
                              modules_to_save=self.modules_to_save, base_model_name_or_path=base_model,
                              task_type="CAUSAL_LM")
        except LorakitError as err:
            raise LorakitError(f"adapter: {err}") from None


@dataclass
class TrainConfig:
    """The ``train:`` section: optimisation, schedule, evaluation, checkpoints, logging."""

    epochs: int = 1
    """Passes over the training rows."""
    max_steps: int | None = None
    """Total optimizer steps; when set it replaces ``epochs`` (the data is cycled as needed)."""
    batch_size: int = 8
    """Rows per batch; with packing, the token budget is ``batch_size * data.max_length``."""
    grad_accum: int = 1
    """Micro-batches summed into one optimizer step (loss averaged over all their answer tokens), per process."""
    micro_batch_tokens: int | str | None = "auto"
    """Largest micro-batch in tensor tokens (rows × the longest row): a batch above it runs as several
    micro-batches of its rows, widest first, whose gradients add up to the batch's (each weighted by its
    answer tokens, as with ``grad_accum``). ``auto``: 1024 on the CPU, where larger micro-batches are no
    faster and only hold more activations; no limit on GPUs. null: no limit."""
    global_batch: int | None = None
    """Rows per optimizer step over all processes (``batch_size × grad_accum × processes``); when set,
    ``grad_accum`` follows from it, so the same config trains the same steps on any number of processes."""
    distributed: str = "ddp"
    """Under torchrun: ``ddp`` (each process holds the whole model) or ``fsdp`` (the frozen base is
    sharded across processes with FSDP2, for bases that do not fit one device)."""
    dist_timeout: float = 1800.0
    """Seconds a process waits for the others in a collective before it stops with an error."""
    lr: float = 2.0e-4
    """Peak learning rate of AdamW."""
    weight_decay: float = 0.0
    """AdamW weight decay (decoupled), applied to the adapter weights."""
    schedule: str = "cosine"
    """Learning-rate decay after warm-up: ``cosine``, ``linear`` or ``constant``."""
    warmup_steps: int = 10
    """Steps of linear warm-up from 0 to ``lr``."""
    min_lr_ratio: float = 0.0
    """Floor of the decay, as a fraction of ``lr``."""
    max_grad_norm: float | None = 1.0
    """Clip the global gradient norm to this (null: no clipping)."""
    seed: int = 0
    """Seeds adapter initialisation and dropout (``data.seed`` orders the batches)."""
    eval_every: int | None = None
    """Evaluate every N steps (and always at the end when there is eval data)."""
    early_stopping_patience: int | None = None
    """Stop after this many evaluations without a better eval loss (null: never)."""
    keep_best: bool = True
    """With eval data, the final adapter is the one with the lowest eval loss."""
    save_every: int | None = 100
    """Write a checkpoint every N steps (also at each evaluation and on Ctrl-C)."""
    keep_checkpoints: int = 2
    """How many recent checkpoints to keep (the best one is kept in addition)."""
    log_every: int = 1
    """Write a ``metrics.jsonl`` row and a plain progress line every N steps."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass: less memory, about 30 % more time."""
    chunked_loss: bool = True
    """Compute the output head and the loss in chunks over the answer tokens only, so the full
    (tokens × vocab) logits never exist (same loss and gradients; architectures with soft-capped or
    scaled logits, or an adapted head, use the model's own loss)."""
    loss_chunk: int | None = None
    """Answer tokens per chunk of the chunked loss (null: about 128 MiB of fp32 logits per chunk)."""
    share_prefix: bool = True
    """With the chunked loss on padded batches: the tokens every row of a micro-batch starts with
    (a chat template's default system prompt, a shared instruction) and that no label scores run
    through the model once, not once per row; the rows continue from that prefix's keys and values.
    The same loss and gradients without dropout; with dropout the prefix draws one mask for the
    micro-batch. Off with gradient checkpointing, packing and FSDP."""
    offload_activations: bool = False
    """CUDA only: keep the activations saved for backward in pinned CPU memory (with
    ``gradient_checkpointing``: only each layer's input). Less GPU memory, some speed; ignored on CPU."""
    compile: bool = False
    """``torch.compile`` each transformer block (worth it on a GPU, for long runs: the first steps
    compile). Off by default; on CPU it needs a C++ compiler and rarely pays."""
    dtype: str = "auto"
    """Base weights and compute: ``auto`` (bf16 on GPUs that support it, and on CPUs that multiply bf16
    natively — AVX512-BF16 or AMX — when only adapters train: not for Spectrum, ``modules_to_save`` or
    base biases; else fp32), ``fp32`` or ``bf16`` (adapter weights and optimizer state stay fp32)."""
    device: str = "auto"
    """``auto`` (cuda when available), ``cpu``, ``cuda``, ``mps``."""
    report_to: list[str] = field(default_factory=list)
    """Also log to ``tensorboard``, ``wandb`` and/or ``trackio`` (when installed)."""
    plots: bool = True
    """Write ``loss.png`` and ``lr.png`` at the end (needs matplotlib)."""

    def __post_init__(self) -> None:
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("grad_accum", 1), ("warmup_steps", 0),
                              ("keep_checkpoints", 1), ("log_every", 1), ("seed", 0)):
            _int(f"train.{name}", getattr(self, name), minimum)
        for name in ("max_steps", "eval_every", "early_stopping_patience", "save_every"):
            if getattr(self, name) is not None:
                _int(f"train.{name}", getattr(self, name), 1)
        self.lr = _number("train.lr", self.lr)
        self.weight_decay = _number("train.weight_decay", self.weight_decay)
        self.min_lr_ratio = _number("train.min_lr_ratio", self.min_lr_ratio)
        if self.lr <= 0:
            raise LorakitError(f"train.lr: expected a positive number, got {self.lr}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise LorakitError(f"train.min_lr_ratio: expected a value in [0, 1], got {self.min_lr_ratio}")
        if self.max_grad_norm is not None:
            self.max_grad_norm = _number("train.max_grad_norm", self.max_grad_norm)
            if self.max_grad_norm <= 0:
                raise LorakitError(f"train.max_grad_norm: expected a positive number or null, got {self.max_grad_norm}")
        _choice("train.schedule", self.schedule, SCHEDULES)
        _choice("train.dtype", self.dtype, DTYPES)
        _choice("train.device", self.device, DEVICES)
        for name in ("chunked_loss", "share_prefix", "offload_activations", "compile"):
            _bool(f"train.{name}", getattr(self, name))
        tokens = self.micro_batch_tokens
        if tokens != "auto" and tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int)
                                                        or tokens < 1):
            raise LorakitError(f"train.micro_batch_tokens: expected auto, an integer >= 1 or null, got {tokens!r}")
        if self.loss_chunk is not None:
            _int("train.loss_chunk", self.loss_chunk, 1)
        _choice("train.distributed", self.distributed, DISTRIBUTED)
        if self.global_batch is not None:
            _int("train.global_batch", self.global_batch, 1)
        self.dist_timeout = _number("train.dist_timeout", self.dist_timeout)
        if self.dist_timeout <= 0:
            raise LorakitError(f"train.dist_timeout: expected a positive number of seconds, got {self.dist_timeout}")
        for name in ("keep_best", "gradient_checkpointing", "plots"):
            _bool(f"train.{name}", getattr(self, name))
        if isinstance(self.report_to, str):
            self.report_to = [] if self.report_to in ("none", "") else [self.report_to]
        for name in self.report_to:
            _choice("train.report_to", name, REPORTERS)


@dataclass
class RunConfig:
    """A whole training run: the YAML file's top level."""

    model: str = "smollm2-135m-instruct"
    """Base model: a hub id in the local cache, a folder, a ``.gguf`` file, or a built-in alias."""
    data: DataConfig = field(default_factory=DataConfig)
    """Where the examples come from (see ``lorakit.data.config.DataConfig``)."""
    adapter: AdapterConfig = field(default_factory=AdapterConfig)
    """The adapter to train."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation, evaluation, checkpoints and logging."""
    output: str = "runs/lorakit"
    """Run folder: config.yaml, adapter/, metrics.jsonl, plots, checkpoints/."""
    resume: str | None = None
    """``auto`` (latest checkpoint in ``output`` if any) or a checkpoint / run folder."""

    def __post_init__(self) -> None:
        for name in ("model", "output"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise LorakitError(f"{name}: expected a non-empty string, got {getattr(self, name)!r}")
        if self.resume is not None and not isinstance(self.resume, str):
            raise LorakitError(f"resume: expected 'auto' or a folder, got {self.resume!r}")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> RunConfig:
        """Build from the YAML mapping; unknown keys at any level are errors with a suggestion.

        Raises:
            LorakitError: an unknown key or a bad value, named by its dotted path.
        """
        if not isinstance(values, dict):
            raise LorakitError(f"expected a mapping of settings at the top level, got {type(values).__name__}")
        _check_keys("", values, cls)
        kwargs = dict(values)
        sections = {"data": DataConfig, "adapter": AdapterConfig, "train": TrainConfig}
        for name, section in sections.items():
            if name in kwargs:
                value = kwargs[name] if kwargs[name] is not None else {}
                if not isinstance(value, dict):
                    raise LorakitError(f"{name}: expected a mapping of settings, got {value!r}")
                if section is DataConfig:
                    kwargs[name] = DataConfig.from_dict(_coerce(DataConfig, value))
                else:
                    _check_keys(f"{name}.", value, section)
                    kwargs[name] = _build(section, _coerce(section, value))
        return _build(cls, kwargs)

    def to_dict(self) -> dict[str, Any]:
        """The resolved config as plain data (what ``config.yaml`` holds)."""
        return dataclasses.asdict(self)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: dict[str, Any] | None = None) -> RunConfig:
    """Read a YAML config, apply ``key=value`` overrides, validate.

    Args:
        path: the YAML file (None: start from ``base`` or the defaults).
        overrides: ``section.key=value`` strings, applied in order.
        base: a mapping to start from when there is no file (the quickstart's).

    Returns:
        The validated config.

    Raises:
        LorakitError: unreadable YAML (with line), unknown keys, bad values or bad overrides.
    """
    import yaml

    values: dict[str, Any] = copy.deepcopy(base or {})  # overrides must not leak into the caller's mapping
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise LorakitError(f"{path}: config file not found")
        try:
            loaded = yaml.safe_load(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise LorakitError(f"{path}: not a UTF-8 text file (byte {err.start}); a config is YAML text") from None
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise LorakitError(f"{path}:{where} not valid YAML: {getattr(err, 'problem', err)}") from None
        if loaded is not None and not isinstance(loaded, dict):
            raise LorakitError(f"{path}: expected a mapping of settings (model:, data:, …), got {type(loaded).__name__}")
        values.update(loaded or {})
    for item in overrides or []:
        apply_override(values, item)
    try:
        return RunConfig.from_dict(values)
    except LorakitError as err:
        raise LorakitError(f"{path}: {err}" if path is not None else str(err)) from None


def apply_override(values: dict[str, Any], item: str) -> None:
    """Set ``section.key=value`` in the nested mapping ``values`` (value parsed as YAML)."""
    import yaml

    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise LorakitError(f"override {item!r}: expected key=value, e.g. train.lr=1e-4")
    parts = key.strip().split(".")
    if len(parts) > 2:
        raise LorakitError(f"override {item!r}: keys are 'name' or 'section.name'")
    try:
        value = yaml.safe_load(text) if text.strip() else None
    except yaml.YAMLError:
        value = text
    target = values
    if len(parts) == 2:
        section = target.get(parts[0])
        if not isinstance(section, dict):
            section = target[parts[0]] = {}
        target = section
    target[parts[-1]] = value


def save_config(config: RunConfig, path: str | Path) -> None:
    """Write the resolved config as YAML (written to a temporary file, then renamed)."""
    import yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, yaml.safe_dump(config.to_dict(), sort_keys=False))


# -- checks ----------------------------------------------------------------------------------------


def _check_keys(prefix: str, values: dict[str, Any], cls: type) -> None:
    known = [f.name for f in fields(cls)]
    for key in values:
        if key not in known:
            close = difflib.get_close_matches(str(key), known, n=1, cutoff=0.5)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"known keys: {', '.join(known)}"
            raise LorakitError(f"unknown key '{prefix}{key}' ({hint})")


def _build(cls: type, kwargs: dict[str, Any]) -> Any:
    return cls(**kwargs)


def _coerce(cls: type, values: dict[str, Any]) -> dict[str, Any]:
    # PyYAML reads `1e-4` (no dot) as a string; accept it where the field takes a number.
    out = dict(values)
    types = {f.name: str(f.type) for f in fields(cls)}
    for key, value in values.items():
        if isinstance(value, str) and ("float" in types.get(key, "") or "int" in types.get(key, "")):
            try:
                out[key] = int(value) if "int" in types[key] and value.strip().lstrip("-").isdigit() else float(value)
            except ValueError:
                pass
    return out


def _int(name: str, value: Any, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise LorakitError(f"{name}: expected an integer >= {minimum}, got {value!r}")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise LorakitError(f"{name}: expected a number, got {value!r}")
    return float(value)


def _bool(name: str, value: Any) -> None:
    if not isinstance(value, bool):
        raise LorakitError(f"{name}: expected true or false, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        close = difflib.get_close_matches(str(value), allowed, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise LorakitError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}{hint}")
