"""The training objective as a module: a batch in, the mean cross-entropy over its answer tokens out.

Training calls the objective rather than the model, so that whatever wraps the step for speed
(a chunked loss) or scale (DDP, FSDP) wraps one module with one ``forward``.
"""

from __future__ import annotations

import torch


class CausalLMLoss(torch.nn.Module):
    """Mean next-token cross-entropy over the tokens whose label is not -100."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.model(**batch, use_cache=False).loss
