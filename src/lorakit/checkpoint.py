"""The old name of :mod:`lorakit.adapter_io` (adapter folder I/O, not training checkpoints: those
are :mod:`lorakit.train.checkpoints`), with the format names it used to hold, now in
:mod:`lorakit.adapters.peft_format`.

Kept only while branches written against it land (``train/`` and some tests still import it);
the house refactor's second milestone removes it. New code imports :mod:`lorakit.adapter_io` and
:mod:`lorakit.adapters.peft_format`.
"""

from lorakit.adapter_io import WEIGHTS_NAME, adapter_state_dict, load_adapter, load_adapters, model_name, save_adapter
from lorakit.adapters.peft_format import PICKLE_WEIGHTS_NAME, PREFIX
from lorakit.adapters.peft_format import read_tensors as read_adapter_tensors

__all__ = ["PICKLE_WEIGHTS_NAME", "PREFIX", "WEIGHTS_NAME", "adapter_state_dict", "load_adapter", "load_adapters",
           "model_name", "read_adapter_tensors", "save_adapter"]
