"""Everything before the first step: device, data, model, adapter, and the state to resume from."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from lorakit.adapter_io import load_adapter
from lorakit.adapters.quant import quantize_model
from lorakit.data.batching import choose_batching
from lorakit.data.pipeline import load_data
from lorakit.errors import LorakitError
from lorakit.inject import add_adapter, parameter_counts, resolve_config
from lorakit.models import default_dtype, load_model, load_tokenizer, resolve
from lorakit.parameter_targets import untargeted_experts_note
from lorakit.train import checkpoints as ckpt
from lorakit.train.config import RunConfig, save_config
from lorakit.train.distributed import Dist, accumulation, decoder_blocks, global_batch_note, start
from lorakit.train.loss import head_check
from lorakit.train.progress import check_reporters
from lorakit.train.run import Run
from lorakit.train.spectrum import prepare_spectrum, resolve_targets

# Sections whose change makes a checkpoint unusable, and the keys that may change on resume.
_MUST_MATCH = ("model", "adapter")
_MAY_CHANGE = {"output", "resume"}


def resolve_device(setting: str) -> torch.device:
    """``auto`` -> cuda when available, else mps, else cpu; a named device must exist."""
    if setting == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if setting == "cuda" and not torch.cuda.is_available():
        raise LorakitError("train.device: cuda was asked for but no CUDA GPU is available (use auto or cpu)")
    return torch.device(setting)


def resolve_dtype(setting: str, device: torch.device, base_trained: bool = False) -> torch.dtype:
    """``auto`` -> bf16 on a GPU that supports it, and on a CPU that multiplies bf16 natively
    (:func:`cpu_bf16`) when only adapters train (``base_trained``: Spectrum, ``modules_to_save`` or
    base biases train base tensors, which AdamW needs in fp32 there); else fp32."""
    if setting == "auto":
        if device.type == "cpu":
            return torch.bfloat16 if cpu_bf16() and not base_trained else torch.float32
        return default_dtype(device)
    return {"fp32": torch.float32, "bf16": torch.bfloat16}[setting]


def cpu_bf16() -> str | None:
    """The CPU feature that makes bf16 matmuls fast here (``AVX512-BF16`` or ``AMX``), or None.

    With it, oneDNN multiplies bf16 natively (4× the fp32 rate measured on an AVX512-BF16 EPYC);
    without it bf16 is emulated and slower than fp32, so training stays fp32.
    """
    if getattr(torch.cpu, "_is_amx_tile_supported", lambda: False)():
        return "AMX"
    if getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)():
        return "AVX512-BF16"
    return None


def build_run(config: RunConfig, quiet: bool = False) -> tuple[Run, Path | None]:
    """Load tokenizer, data and model, add (or restore) the adapter, build the optimizer.

    Returns:
        The :class:`Run` and the checkpoint it resumes from (None for a fresh run).
    """
    device = resolve_device(config.train.device)
    dist, device = start(config.train.distributed, config.train.dist_timeout, device)
    try:
        return _build(config, dist, device, quiet or not dist.is_main)
    except BaseException:
        dist.close()
        raise


def _build(config: RunConfig, dist: Dist, device: torch.device, quiet: bool) -> tuple[Run, Path | None]:
    say = (lambda *a: None) if quiet else print
    check_reporters(config.train.report_to)
    if dist.sharded and config.adapter.quantized:
        raise LorakitError("train.distributed: fsdp does not shard an NF4 (qlora) base yet; use ddp, or "
                           "method: lora with fsdp")
    output = Path(config.output)
    resume_from = ckpt.find_resume(config.resume, output) if config.resume else None
    if config.resume == "auto" and resume_from is None:
        say(f"resume: auto: no checkpoint in {output / 'checkpoints'}, starting a new run")
    elif resume_from is None and ckpt.list_checkpoints(output / "checkpoints"):
        raise LorakitError(f"{output} already holds checkpoints of a run; continue it with resume=auto "
                           f"(--resume auto), or choose another output folder")
    adapter = config.adapter
    base_trained = adapter.method == "spectrum" or bool(adapter.modules_to_save) or adapter.bias != "none"
    dtype = resolve_dtype(config.train.dtype, device, base_trained)
    if config.train.dtype == "auto" and device.type == "cpu" and dtype == torch.bfloat16:
        say(f"train.dtype: auto: bf16 on this CPU ({cpu_bf16()}: native bf16 matmuls); the adapter and AdamW "
            "state stay fp32 (train.dtype=fp32 for full precision)")
    if dist.is_main:
        output.mkdir(parents=True, exist_ok=True)
        save_config(config, output / "config.yaml")

    with dist.main_first():  # process 0 fills the caches (converted model, tokenised data) first
        resolve(config.model)
        tokenizer = load_tokenizer(config.model)
        splits = load_data(config.data, tokenizer)
    for report in splits.reports:
        for line in report.summary():
            say(line)
    # FSDP shards the base from the CPU onto each device: no device ever holds the whole base.
    sharded = dist.sharded
    model = load_model(config.model, dtype=dtype, device=torch.device("cpu") if sharded else device)
    if config.data.packing is not False:
        _varlen_attention(model, device, dtype, say)
    if config.adapter.quantized:
        quantize_model(model, compute_dtype=dtype)
    if _fit_dropout(config, model, say) and dist.is_main:
        save_config(config, output / "config.yaml")
    torch.manual_seed(config.train.seed)
    with dist.main_first():  # the Spectrum scan is cached per model
        targets = resolve_targets(config, say, model)
    if resume_from is not None:
        _check_compatible(config, resume_from, print if dist.is_main else say)  # a warning even when quiet
    if config.adapter.method == "spectrum":
        prepare_spectrum(model, config, targets, resume_from)
    elif resume_from is not None:
        load_adapter(model, resume_from, trainable=True)
    else:
        add_adapter(model, config.adapter.to_lora_config(base_model=config.model, targets=targets))
    experts_note = untargeted_experts_note(model, "adapter.targets")
    if experts_note:
        say(experts_note)
    if config.train.gradient_checkpointing:
        # Non-reentrant checkpointing needs no input gradients, so it works with a frozen base.
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if config.train.offload_activations and device.type != "cuda":
        say(f"train.offload_activations: only acts on CUDA GPUs; ignored on {device.type}")
    fallback = head_check(model) if config.train.chunked_loss else None
    if fallback:  # said once: the run is slower and holds the full logits
        say(f"train.chunked_loss: {fallback}; the loss runs through the model's own forward (full logits)")
    if config.train.compile:
        compile_blocks(model)
    keep = _kept_global_batch(resume_from, config, dist.world) if resume_from is not None else None
    accum, note = accumulation(config.train.batch_size, config.train.grad_accum, config.train.global_batch,
                               dist.world, keep)
    if note:
        say(note)
    batching = _batching(config, model, device, resume_from)
    run = Run(config, model, tokenizer, splits, device, dtype, dist=dist, accum=accum, batching=batching)
    if resume_from is not None:
        state, rng = ckpt.load_checkpoint(resume_from, run.optimizer)
        if state.global_batch and state.global_batch != run.global_batch:
            say(f"resume: the checkpoint was trained with a global batch of {state.global_batch} rows, this run "
                f"uses {run.global_batch}: the batches from here on differ from an uninterrupted run")
        state.config, state.global_batch, state.world_size = config.to_dict(), run.global_batch, dist.world
        state.packing = run.batching.packed
        run.state = state
        ckpt.set_rng_state(rng)
        if state.step >= run.total:
            say(f"the checkpoint is at step {state.step} of {run.total}: nothing left to train")
    if dist.rank > 0:  # own dropout masks per process; process 0 keeps the stream a checkpoint stores
        torch.manual_seed(hash((config.train.seed, dist.rank, run.state.step)) % 2**62)
    trainable, total = parameter_counts(model)
    eval_rows = len(splits.eval) if splits.eval is not None else 0
    say(f"{config.model}: {trainable:,} trainable of {total:,} parameters ({100 * trainable / total:.3f} %); "
        f"{len(splits.train):,} train rows, {eval_rows:,} eval rows; {run.total} steps on {device} ({dtype})")
    say(global_batch_note(config.train.batch_size, run.accum, dist.world, dist.strategy))
    say(batching.describe(config.train.batch_size, config.data.max_length, config.data.group_by_length))
    return run, resume_from


def _varlen_attention(model: torch.nn.Module, device: torch.device, dtype: torch.dtype, say) -> None:
    """On CUDA in bf16/fp16 with flash-attention installed, attention runs through its kernel, whose
    variable-length path skips across packed examples (so ``data.packing: auto`` packs)."""
    if device.type != "cuda" or dtype not in (torch.bfloat16, torch.float16):
        return
    from transformers.utils import is_flash_attn_2_available

    if not is_flash_attn_2_available() or getattr(model.config, "_attn_implementation", None) != "sdpa":
        return
    try:
        model.set_attn_implementation("flash_attention_2")
    except (ValueError, ImportError) as err:  # the architecture does not support it
        say(f"attention: flash-attention is installed, but {type(model).__name__} cannot use it ({err}); sdpa it is")


def _batching(config: RunConfig, model: torch.nn.Module, device: torch.device, resume_from: Path | None):
    """``data.packing`` resolved for this model and device; a resumed ``auto`` run keeps its checkpoint's
    choice (the batch plan, so the data position, depends on it)."""
    attention = getattr(getattr(model, "config", None), "_attn_implementation", None)
    batching = choose_batching(config.data.packing, attention, device.type)
    if resume_from is None or config.data.packing != "auto":
        return batching
    kept = json.loads((resume_from / ckpt.STATE_FILE).read_text()).get("packing")
    if kept is None or kept == batching.packed:
        return batching
    chosen = choose_batching(bool(kept), attention, device.type)
    return dataclasses.replace(chosen, reason=f"data.packing: auto, {'packed' if kept else 'padded'} as when this "
                                              "run started: the checkpoint's batch plan")


def _fit_dropout(config: RunConfig, model: torch.nn.Module, say=print) -> bool:
    """Set ``adapter.dropout`` to 0 when the adapter will target parameters (MoE experts): PEFT's
    format has one dropout per adapter and PEFT refuses any on target parameters. Says so; True if
    it changed the config."""
    adapter = config.adapter
    if adapter.dropout == 0 or adapter.method == "spectrum" or adapter.spectrum_top is not None:
        return False
    _, _, parameters = resolve_config(model, adapter.to_lora_config(base_model=config.model), strict=False)
    if not parameters:
        return False
    say(f"adapter.dropout: {adapter.dropout:g} -> 0: the adapter targets parameters (the experts: "
        f"{parameters[0][2]}, …), which take no dropout in PEFT's format, and one adapter has one dropout "
        "(set adapter.dropout: 0 to say so yourself)")
    adapter.dropout = 0.0
    return True


def _kept_global_batch(checkpoint: Path, config: RunConfig, world: int) -> int | None:
    """The checkpoint's global batch when only the number of processes changed (so it can be kept)."""
    state = json.loads((checkpoint / ckpt.STATE_FILE).read_text())
    saved = state.get("config", {}).get("train", {})
    same = all(saved.get(k) == getattr(config.train, k) for k in ("batch_size", "grad_accum", "global_batch"))
    return (state.get("global_batch") or None) if same and state.get("world_size", 1) != world else None


def compile_blocks(model: torch.nn.Module) -> int:
    """``torch.compile`` each transformer block in place (state-dict keys unchanged); returns how many.

    Blocks are :func:`~lorakit.train.distributed.decoder_blocks` (transformers' decoder layers); a
    model without them is compiled whole. Shapes vary from batch to batch, so dynamic shapes are on.
    """
    blocks = decoder_blocks(model)
    for block in blocks or [model]:
        block.compile(dynamic=True)
    return len(blocks) or 1


def _check_compatible(config: RunConfig, checkpoint: Path, say=print) -> None:
    saved = json.loads((checkpoint / ckpt.STATE_FILE).read_text()).get("config", {})
    now = config.to_dict()
    for section in _MUST_MATCH:
        if section in saved and saved[section] != now[section]:
            raise LorakitError(f"resume: {checkpoint} was trained with {section} = {saved[section]!r}, this config "
                               f"has {now[section]!r}; resume with the same {section}, or start a new run")
    changed = [f"{s}.{k}" for s in ("data", "train") if isinstance(saved.get(s), dict)
               for k in now[s] if saved[s].get(k) != now[s][k]]
    if changed:
        say(f"resume: settings changed since the checkpoint ({', '.join(changed)}); the run continues, "
            "but is no longer an exact continuation")
