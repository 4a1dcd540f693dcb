"""Memory planner: will this fine-tuning configuration fit, and what to change when it does not.

Everything comes from the model's config: the model is instantiated on the ``meta`` device (no
weights, no memory) so parameter counts and shapes are exact for any transformers architecture.

- :mod:`~lorakit.estimate.setup`: the configuration planned for (:class:`Setup`), ``--gpu`` sizes
  (:func:`parse_size`), dtype sizes and NF4 storage (:func:`nf4_bytes`);
- :mod:`~lorakit.estimate.model_inventory`: what the config builds, counted on the meta model
  (:func:`inventory` → :class:`Inventory` of :class:`Linear` layers and :class:`Expert` weights);
- :mod:`~lorakit.estimate.targets`: what a setup trains on it, resolved by ``inject`` as training
  resolves it (:func:`what_trains` → :class:`Trained`);
- :mod:`~lorakit.estimate.activations`: what the layers and the loss keep for backward, per token
  (the loss path decided by ``train.loss.head_check``, as training decides it);
- :mod:`~lorakit.estimate.plan`: the peak of one step by part (:func:`estimate` → :class:`Estimate`)
  and the changes that fit a budget (:func:`suggest`).

Checked against a measured CPU training step in tests/test_estimate.py; docs/estimate.md lists
what the model leaves out.
"""

from lorakit.estimate.model_inventory import Expert, Inventory, Linear, inventory
from lorakit.estimate.plan import Estimate, estimate, suggest
from lorakit.estimate.setup import DTYPE_BYTES, ENGINES, GIB, GPU_ALIASES, PLAN_METHODS, Setup, nf4_bytes, parse_size
from lorakit.estimate.targets import ParamTarget, Trained, what_trains

__all__ = ["DTYPE_BYTES", "ENGINES", "GIB", "GPU_ALIASES", "PLAN_METHODS", "Estimate", "Expert", "Inventory", "Linear",
           "ParamTarget", "Setup", "Trained", "estimate", "inventory", "nf4_bytes", "parse_size", "suggest",
           "what_trains"]
