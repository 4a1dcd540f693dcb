"""Saved adapter files stay byte-identical: each case below is rebuilt with the current code and
compared, file for file and byte for byte, with the folder committed in ``fixtures/saved_bytes``.

The fixtures were written before the house refactor (#17) moved the format code, so this test is
what says the refactor changed no file. Tensor values are set from integers (``randint / 1024``,
exact in fp32) and PiSSA starts from diagonal weights (an SVD that is exact), so the bytes depend
on the format code only, not on the machine's BLAS or vector width.

To rewrite the fixtures after a deliberate format change (say so in the commit)::

    python tests/test_saved_bytes.py --write
"""

from __future__ import annotations

import sys
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

FIXTURES = Path(__file__).parent / "fixtures" / "saved_bytes"
BASE_NAME = "tiny-base"  # recorded as base_model_name_or_path


def _tiny(arch: str):
    from conftest import make_tiny

    return make_tiny(arch)


def _key(name: str) -> str:
    # A parameter's name without adapter names (``.default``, ``.second``), so its values do not
    # depend on where the model keeps it or in which order it is visited.
    for adapter in (".default", ".second"):
        name = name.replace(adapter, "")
    return name


def _set_values(model: torch.nn.Module, salt: int = 0, biases: bool = False) -> None:
    """Give every adapter tensor (and base biases if ``biases``) exact, trained-looking values."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_" in name or "modules_to_save" in name or (biases and name.endswith("bias")):
                generator = torch.Generator().manual_seed(zlib.crc32(_key(name).encode()) + salt)
                values = torch.randint(-512, 512, param.shape, generator=generator).float() / 1024
                param.copy_(values)


def _add(model, salt: int = 0, biases: bool = False, name: str = "default", **kwargs) -> None:
    from lorakit import LoraConfig, add_adapter

    add_adapter(model, LoraConfig(**kwargs), name)
    _set_values(model, salt, biases)


def _save(model, out: Path, **kwargs) -> None:
    from lorakit import save_adapter

    save_adapter(model, out, base_model_name_or_path=BASE_NAME, **kwargs)


def lora_all_linear(out: Path) -> None:
    model = _tiny("llama")
    _add(model, r=4, lora_alpha=8, lora_dropout=0.05, target_modules="all-linear", task_type="CAUSAL_LM")
    _save(model, out)


def rslora_patterns(out: Path) -> None:
    model = _tiny("llama")
    _add(model, r=8, lora_alpha=4, use_rslora=True, target_modules=["q_proj", "v_proj", "down_proj"],
         rank_pattern={"down_proj": 2}, alpha_pattern={"q_proj": 32})
    _save(model, out)


def dora(out: Path) -> None:
    model = _tiny("llama")
    _add(model, r=4, lora_alpha=8, use_dora=True, target_modules=["q_proj", "v_proj", "down_proj"])
    _save(model, out)


def lora_bias(out: Path) -> None:
    model = _tiny("qwen2")  # q/k/v have base biases: lora_only trains those of adapted layers
    _add(model, biases=True, r=4, lora_alpha=8, lora_bias=True, bias="lora_only", target_modules=["q_proj", "v_proj"])
    _save(model, out)


def bias_all(out: Path) -> None:
    model = _tiny("qwen2")
    _add(model, biases=True, r=4, lora_alpha=8, bias="all", target_modules=["q_proj", "v_proj"])
    _save(model, out)


def gpt2_conv1d(out: Path) -> None:
    model = _tiny("gpt2")  # Conv1D stores W as (in, out): fan_in_fan_out
    _add(model, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    _save(model, out)


def embedding(out: Path) -> None:
    model = _tiny("llama")
    _add(model, r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"])
    _save(model, out)


def modules_to_save(out: Path) -> None:
    model = _tiny("llama")
    _add(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], modules_to_save=["lm_head"])
    _save(model, out)


def multi_adapter(out: Path) -> None:
    from lorakit import LoraConfig, add_adapter

    model = _tiny("llama")
    add_adapter(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]), "default")
    add_adapter(model, LoraConfig(r=2, lora_alpha=2, target_modules=["k_proj", "o_proj"]), "second")
    _set_values(model)
    _save(model, out)  # default at the top, second/ beside it


def pissa_to_lora(out: Path) -> None:
    model = _tiny("llama")
    with torch.no_grad():  # W = [diag(d), 0]: LAPACK's SVD of it is exact on every machine
        for name, module in model.named_modules():
            if name.endswith(("q_proj", "v_proj")):  # (32, 32) and (16, 32)
                k = module.out_features
                module.weight.zero_()
                module.weight[:, :k] = torch.diag(torch.tensor([2.0 - i / 32 for i in range(k)]))
    _add(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights="pissa")
    _save(model, out, pissa_to_lora=True)  # rank 2r: [A; A0], [B, -B0]


def combine_cat(out: Path) -> None:
    from lorakit.combine import combine_folders

    first, second = out.parent / f".{out.name}-a", out.parent / f".{out.name}-b"
    lora_all_linear(first)
    rslora_patterns(second)
    combine_folders([first, second], out, weights=[1.0, 0.5], method="cat")


CASES: dict[str, Callable[[Path], None]] = {f.__name__: f for f in (
    lora_all_linear, rslora_patterns, dora, lora_bias, bias_all, gpt2_conv1d, embedding, modules_to_save,
    multi_adapter, pissa_to_lora, combine_cat)}


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _difference(name: str, want: bytes, got: bytes) -> str:
    """Where two files differ: the keys of a safetensors file, else the first differing line."""
    if name.endswith(".safetensors"):
        from safetensors.torch import load

        a, b = load(want), load(got)
        keys = sorted(set(a) ^ set(b)) or [k for k in sorted(a) if a[k].dtype != b[k].dtype or a[k].shape != b[k].shape
                                          or not torch.equal(a[k], b[k])]
        return f"{name}: tensors differ: {keys[:5] or 'same tensors, other header/metadata bytes'}"
    for i, (x, y) in enumerate(zip(want.decode().splitlines(), got.decode().splitlines())):
        if x != y:
            return f"{name} line {i + 1}: fixture {x!r}, now {y!r}"
    return f"{name}: one is a prefix of the other"


@pytest.mark.parametrize("case", list(CASES))
def test_saved_files_are_byte_identical_to_the_fixture(case, tmp_path):
    out = tmp_path / case
    CASES[case](out)
    want, got = _files(FIXTURES / case), _files(out)
    assert want, f"no fixture for {case}: run python tests/test_saved_bytes.py --write"
    assert sorted(got) == sorted(want), f"{case}: files {sorted(got)}, fixture has {sorted(want)}"
    for name in want:
        assert got[name] == want[name], f"{case}: " + _difference(name, want[name], got[name])


def _write_fixtures() -> None:
    import shutil

    for case, build in CASES.items():
        out = FIXTURES / case
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        build(out)
        for tmp in out.parent.glob(f".{case}-*"):
            shutil.rmtree(tmp)
        print(f"{case}: {sum(len(b) for b in _files(out).values()):,d} bytes")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write"]:
        sys.exit(__doc__)
    sys.path.insert(0, str(Path(__file__).parent))
    _write_fixtures()
