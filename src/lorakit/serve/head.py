"""A causal LM's forward in its two parts, backbone then output head, checked against the model.

Prompt logprobs (``echo`` with ``logprobs``) need the distribution at every prompt position, and
the prefix cache keeps each cached token's last hidden state so that they can be recomputed later.
``model(...)`` would give neither without a (B, T, vocab) logits tensor at once. So the engine's
prefill runs the backbone (``model.<base_model_prefix>``: hidden states (B, T, d)) and applies
the output head (``model.get_output_embeddings()``) itself: to each row's last position for the
next token, and in chunks of positions for prompt logprobs.

That is only right when the model's logits *are* its head applied to the backbone's last hidden
state (plus a final logit soft-capping, which Gemma 2 applies and :meth:`OutputHead.logits`
applies too). :meth:`OutputHead.split` does not trust a list of architectures: it runs both ways
on a few tokens and compares. A model that differs (another scaling of the logits, a head that
does more) gets None, and the engine then runs ``model(...)`` as before and refuses prompt
logprobs with a message saying why.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

PROBE_TOKENS = 5


class OutputHead:
    """``model``'s backbone and output head (whose adapter slots apply, they are the model's modules)."""

    def __init__(self, backbone: nn.Module, head: nn.Module, softcap: float | None) -> None:
        self.backbone, self.head, self.softcap = backbone, head, softcap

    @classmethod
    def split(cls, model: nn.Module) -> OutputHead | None:
        """The two parts of ``model``, if together they compute exactly its logits; else None."""
        backbone = getattr(model, getattr(model, "base_model_prefix", "") or "", None)
        getter = getattr(model, "get_output_embeddings", None)
        head = getter() if getter is not None else None
        if not isinstance(backbone, nn.Module) or backbone is model or not isinstance(head, nn.Module):
            return None
        softcap = getattr(model.config, "final_logit_softcapping", None)
        parts = cls(backbone, head, float(softcap) if softcap else None)
        device = next(model.parameters()).device
        vocab = model.get_input_embeddings().num_embeddings
        ids = torch.arange(PROBE_TOKENS, device=device).remainder(vocab)[None]  # (1, 5): any tokens do
        with torch.inference_mode():
            try:
                theirs = model(input_ids=ids, use_cache=False).logits.float()
                ours = parts.logits(parts.hidden(input_ids=ids, use_cache=False))
            except Exception:  # a backbone that needs other inputs: not split
                return None
        scale = float(theirs.abs().max()) or 1.0
        return parts if torch.allclose(ours, theirs, rtol=1e-4, atol=1e-4 * scale) else None

    def hidden(self, **inputs: Any) -> torch.Tensor:
        """The backbone's last hidden states (B, T, d) for the model's own keyword inputs."""
        return self.backbone(**inputs)[0]

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """fp32 logits (…, vocab) for hidden states (…, d), as the model computes them."""
        logits = self.head(hidden).float()
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits
