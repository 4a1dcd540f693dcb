"""Spectrum: rank weight matrices by signal-to-noise ratio and train only the best ones.

- :mod:`~lorakit.spectrum.ranking`: the SNR of one matrix (a pure function) and the selection of
  the top share per module type; routed experts' weights of MoE models are not ranked
  (:func:`is_expert_weight`: they train as 3-D tensors, through ``target_parameters``);
- :mod:`~lorakit.spectrum.scanner`: the streamed scan of a model folder, cached per model;
- :mod:`~lorakit.spectrum.report`: the ranked table and the training-config fragment
  ``lorakit spectrum`` prints.

Two ways to train with the selection: :func:`selected_modules` gives LoRA target names
(``targets: spectrum:25``); ``method: spectrum`` trains those tensors fully
(:mod:`lorakit.spectrum_model`: :func:`freeze_for_spectrum`, :func:`save_spectrum`,
:func:`load_spectrum`, re-exported here). A training run uses both through
:mod:`lorakit.train.spectrum`.
"""

from lorakit.spectrum.ranking import MatrixSnr, is_expert_weight, module_type, select, selected_modules, snr, snr_from_singular_values
from lorakit.spectrum.report import format_table, yaml_snippet
from lorakit.spectrum.scanner import Progress, default_cache_dir, excluded_experts, model_fingerprint, scan
from lorakit.spectrum_model import CONFIG_NAME, WEIGHTS_NAME, freeze_for_spectrum, load_spectrum, save_spectrum

__all__ = ["CONFIG_NAME", "WEIGHTS_NAME", "MatrixSnr", "Progress", "default_cache_dir", "excluded_experts", "format_table",
           "freeze_for_spectrum", "is_expert_weight", "load_spectrum", "model_fingerprint", "module_type", "save_spectrum",
           "scan", "select", "selected_modules", "snr", "snr_from_singular_values", "yaml_snippet"]
