"""The old name of :mod:`lorakit.adapter_io` (adapter folder I/O, not training checkpoints: those
are :mod:`lorakit.train.checkpoints`).

Kept only while branches written against it land (``train/`` and some tests still import it);
the house refactor's second milestone removes it. New code imports :mod:`lorakit.adapter_io`.
"""

from lorakit.adapter_io import WEIGHTS_NAME, adapter_state_dict, load_adapter, load_adapters, model_name, save_adapter

__all__ = ["WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "load_adapters", "model_name", "save_adapter"]
