"""One model, one data file: answer loss, perplexity and generation metrics.

:func:`evaluate` is the evaluation callable of lorakit (``lorakit eval`` calls it for the base and
for each adapter; the final evaluation of ``lorakit train`` calls it too). It reads the file with
the data pipeline, so the tokens that count for the loss are exactly the answer tokens training
learns (same chat template, same masks), and generates with greedy decoding in left-padded
batches from the prompt that precedes each example's last assistant turn.

Notable:

- The loss is the mean cross-entropy over every answer token of the file (not a mean of batch
  means), computed from the logits so each row's own loss is known too.
- Prompts are sorted by length before batching (less padding) and the outputs put back in file
  order; ``max_new_tokens`` defaults to the longest reference plus a margin, so a model that does
  not stop costs bounded time.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from lorakit.data.collation import collate_padded
from lorakit.data.config import DataConfig
from lorakit.data.pipeline import pad_token_id
from lorakit.data.templates import PLAIN_TEMPLATE, render, resolve_template
from lorakit.data.tokenize import DataReport, iter_samples, tokenize_file
from lorakit.errors import LorakitError
from lorakit.evaluate import metrics as M
from lorakit.train.loss import causal_inputs, default_chunk, split_head

IGNORE = -100


@dataclass
class EvalConfig:
    """How to evaluate; the defaults suit a few hundred chat examples on one machine."""

    batch_size: int = 8
    """Rows per forward pass (loss) and prompts per generation batch."""
    max_length: int = 1024
    """Rows longer than this (in tokens) are truncated for the loss, as in training."""
    format: str = "auto"
    """Data format of the file (see ``lorakit.data``)."""
    chat_template: str = "auto"
    """``auto`` (the tokenizer's own), ``plain``, or a Jinja template — as in training."""
    limit: int | None = None
    """Evaluate only the first N examples."""
    generate: bool = True
    """Also generate answers and score them."""
    max_new_tokens: int | None = None
    """Generation budget; None = longest reference + 50 % + 16 tokens, at most 512."""
    metrics: list[str] | None = None
    """Built-in metrics; None = exact/normalized match and contains, plus json_valid for JSON answers."""
    user_metrics: list[str] = field(default_factory=list)
    """``module:function`` specs, each called as ``function(prediction, reference)``."""
    json_schema: dict | None = None
    """Also report ``json_schema``: the share of answers that parse and satisfy this schema."""
    data: Any = None
    """A training run's ``DataConfig``: when set, files are tokenised with its settings (format,
    template, ``max_length``, ``train_on_inputs``, ``last_turn_only``), so the loss counts exactly
    the tokens training learnt; ``format``/``chat_template``/``max_length`` above are then ignored."""

    def __post_init__(self) -> None:
        for name in ("batch_size", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise LorakitError(f"eval {name} must be an integer >= 1, got {value!r}")
        if self.limit is not None and (not isinstance(self.limit, int) or self.limit < 1):
            raise LorakitError(f"--limit must be an integer >= 1, got {self.limit!r}")

    def data_config(self, path: str, text: bool = False) -> Any:
        import dataclasses

        if self.data is not None and not text:
            return dataclasses.replace(self.data, train=path, eval=None, eval_split=None, packing=False, cache=False)
        return DataConfig(train=path, format="text" if text else self.format, max_length=self.max_length,
                          chat_template=self.chat_template, packing=False, cache=False)


@dataclass
class Example:
    """A generation example: the prompt conversation and the reference answer."""

    where: str
    line: int
    prompt: list[dict[str, str]]
    reference: str


@dataclass
class EvalData:
    """A file read for evaluation: tokenised rows for the loss, examples for generation."""

    path: str
    rows: Any  # TokenizedDataset
    examples: list[Example]
    template: str


def read_eval_data(path: str, tokenizer: Any, config: EvalConfig, text: bool = False) -> EvalData:
    """Tokenise ``path`` as training would and collect its generation examples (first ``limit``).

    Raises:
        LorakitError: a missing or malformed file (the row is named).
    """
    data_config = config.data_config(path, text)
    rows, _ = tokenize_file(path, tokenizer, data_config, use_cache=False)
    if config.limit is not None and config.limit < len(rows):
        rows = rows.select(range(config.limit))
    examples = []
    if not text:
        for sample in iter_samples(path, data_config, DataReport(source=path)):
            if config.limit is not None and len(examples) >= config.limit:
                break
            messages = sample.messages
            if messages and messages[-1]["role"] == "assistant":
                examples.append(Example(sample.where, sample.line, messages[:-1], messages[-1]["content"]))
    return EvalData(path, rows, examples, resolve_template(tokenizer, config.chat_template))


# -- loss ----------------------------------------------------------------------------------------


def answer_loss(model: torch.nn.Module, rows: Any, pad_token_id: int, batch_size: int = 8,
                progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Cross-entropy over the labelled (answer) tokens of tokenised ``rows``.

    Args:
        model: a causal LM (with or without adapters).
        rows: a ``TokenizedDataset``.
        pad_token_id: the padding id.
        batch_size: rows per forward pass.
        progress: called with the number of rows done after each batch.

    Returns:
        ``loss`` (mean over all answer tokens), ``perplexity``, ``tokens``, ``rows`` and
        ``row_losses`` (each row's mean; None for a row without answer tokens).
    """
    device = next(model.parameters()).device
    parts = split_head(model)  # a plain linear head: logits only where a label scores, a chunk at a time
    order = sorted(range(len(rows)), key=lambda i: -int(rows.lengths[i]))  # similar lengths together
    row_sums = [0.0] * len(rows)
    row_counts = [0] * len(rows)
    with torch.no_grad():
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            batch = collate_padded([rows.row(i) for i in chunk], pad_token_id=pad_token_id)
            labels = batch.pop("labels")
            inputs = {k: v.to(device) for k, v in batch.items()}
            if parts is not None:  # a causal decoder: right padding needs no mask (SDPA's causal kernel then)
                out = parts[0](**causal_inputs(inputs), use_cache=False)[0][:, :-1]  # (B, T-1, d) hidden states
            else:
                out = model(**inputs, use_cache=False).logits[:, :-1]  # (B, T-1, V)
            targets = labels[:, 1:].to(device)  # position t predicts token t+1
            for j, i in enumerate(chunk):  # one row at a time: its fp32 logits stay (answer tokens, V) at most
                keep = targets[j] != IGNORE
                row_sums[i] = _scored_loss(out[j][keep], targets[j][keep], parts)
                row_counts[i] = int(keep.sum())
            if progress:
                progress(len(chunk))
    tokens = sum(row_counts)
    mean = sum(row_sums) / tokens if tokens else float("nan")
    return {"loss": mean, "perplexity": math.exp(mean) if tokens and mean < 700 else float("inf"),
            "tokens": tokens, "rows": len(rows),
            "row_losses": [s / c if c else None for s, c in zip(row_sums, row_counts)]}


def _scored_loss(out: torch.Tensor, targets: torch.Tensor, parts: tuple | None) -> float:
    """Summed cross-entropy of scored positions: ``out`` holds their logits, or (with ``parts``) their
    hidden states, which go through the head in chunks (the logits of the model's dtype, upcast, as HF does)."""
    if parts is None:
        return float(torch.nn.functional.cross_entropy(out.float(), targets, reduction="sum"))

    head = parts[1]
    step = default_chunk(head.weight.shape[0])
    return sum(float(torch.nn.functional.cross_entropy(head(out[k:k + step]).float(), targets[k:k + step],
                                                       reduction="sum")) for k in range(0, len(out), step))


# -- generation ----------------------------------------------------------------------------------


def generate(model: torch.nn.Module, tokenizer: Any, examples: Sequence[Example], template: str,
             batch_size: int = 8, max_new_tokens: int = 128,
             progress: Callable[[int], None] | None = None) -> list[str]:
    """Greedy answers to each example's prompt, rendered with ``template`` as in training.

    Returns:
        The decoded answers (special tokens removed, surrounding whitespace stripped), in order.
    """
    device = next(model.parameters()).device
    prompts = [generation_prompt(tokenizer, template, ex) for ex in examples]
    pad = pad_token_id(tokenizer)
    stop = _stop_ids(model, tokenizer)
    outputs: list[str] = [""] * len(examples)
    order = sorted(range(len(examples)), key=lambda i: -len(prompts[i]))
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, i in enumerate(chunk):  # left padding: every prompt ends where generation starts
            ids[j, width - len(prompts[i]):] = torch.tensor(prompts[i])
            mask[j, width - len(prompts[i]):] = 1
        with torch.no_grad():
            generated = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                       max_new_tokens=max_new_tokens, pad_token_id=pad, eos_token_id=stop,
                                       temperature=None, top_p=None, top_k=None)
        for j, i in enumerate(chunk):
            outputs[i] = tokenizer.decode(generated[j, width:], skip_special_tokens=True).strip()
        if progress:
            progress(len(chunk))
    return outputs


def generation_prompt(tokenizer: Any, template: str, example: Example) -> list[int]:
    """The token ids an answer to ``example`` is generated from: its prompt rendered with ``template``
    and the generation prompt, tokenised as training tokenises it (the template's own special
    tokens; the tokenizer's only for the plain template)."""

    text, _ = render(tokenizer, template, example.prompt, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=template == PLAIN_TEMPLATE)["input_ids"])


def _stop_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    ids = []
    config = getattr(model, "generation_config", None)
    for value in (getattr(config, "eos_token_id", None), tokenizer.eos_token_id):
        ids += value if isinstance(value, list) else ([value] if value is not None else [])
    return sorted(set(ids))


def default_max_new_tokens(tokenizer: Any, examples: Sequence[Example]) -> int:
    """Longest reference in tokens, plus half, plus 16 (room to finish), capped at 512."""
    longest = max((len(tokenizer(e.reference, add_special_tokens=False)["input_ids"]) for e in examples), default=16)
    return min(512, int(longest * 1.5) + 16)


def metric_functions(config: EvalConfig, references: list[str]) -> dict[str, M.Metric]:
    """The metrics to compute: the chosen built-ins, the schema check, then user functions."""
    names = config.metrics
    if names is None:
        names = ["exact_match", "normalized_match", "contains"]
        if M.looks_like_json(references):
            names.append("json_valid")
    found = M.builtin_metrics(list(names))
    if config.json_schema is not None:
        found["json_schema"] = M.schema_metric(config.json_schema)
    for spec in config.user_metrics:
        name, func = M.load_user_metric(spec)
        found[name] = func
    return found


def score_predictions(predictions: list[str], examples: Sequence[Example],
                      functions: dict[str, M.Metric]) -> tuple[dict[str, float], list[dict[str, float]]]:
    """Mean of each metric, and each example's scores."""
    per = [{name: M.score(name, f, p, ex.reference, ex.where) for name, f in functions.items()}
           for p, ex in zip(predictions, examples)]
    means = {name: sum(s[name] for s in per) / len(per) for name in functions} if per else {}
    return means, per


# -- the callable ----------------------------------------------------------------------------------


def evaluate(model: torch.nn.Module, tokenizer: Any, data: str | EvalData, config: EvalConfig | None = None,
             progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Evaluate ``model`` as it is now (active adapters, or none) on a data file.

    Args:
        model: a causal LM, in eval mode (adapters active as they should be measured).
        tokenizer: its tokenizer.
        data: a data file path (any format of ``lorakit.data``), :func:`read_eval_data` output
            (read once, evaluated for several models), or a ``TokenizedDataset`` (loss only).
        config: settings (default :class:`EvalConfig`).
        progress: called with the number of rows/examples done, for a progress bar.

    Returns:
        ``loss``, ``perplexity``, ``tokens``, ``rows`` (answer-token cross-entropy over the file),
        ``row_losses``, and with generation ``metrics`` (name -> mean score), ``predictions`` and
        ``scores`` (per example), ``max_new_tokens``.

    Raises:
        LorakitError: bad data, a metric that cannot be loaded or that raises (named with the example).
    """
    config = config or EvalConfig()
    if isinstance(data, str):
        data = read_eval_data(data, tokenizer, config)
    elif not isinstance(data, EvalData):  # tokenised rows (a held-out split): loss only

        rows = data.select(range(min(config.limit, len(data)))) if config.limit else data
        data = EvalData(getattr(data, "source", ""), rows, [], resolve_template(tokenizer, config.chat_template))
    was_training = model.training
    model.eval()
    try:
        result = answer_loss(model, data.rows, pad_token_id(tokenizer), config.batch_size, progress)
        if config.generate and data.examples:
            functions = metric_functions(config, [e.reference for e in data.examples])
            budget = config.max_new_tokens or default_max_new_tokens(tokenizer, data.examples)
            predictions = generate(model, tokenizer, data.examples, data.template, config.batch_size, budget, progress)
            means, per = score_predictions(predictions, data.examples, functions)
            result.update(metrics=means, predictions=predictions, scores=per, max_new_tokens=budget)
    finally:
        model.train(was_training)
    return result
