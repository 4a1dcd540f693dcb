"""lorakit: LoRA fine-tuning from data set to evaluated, merged, combined or served adapter.

The PEFT-style names (``LoraConfig``, ``get_peft_model``, ``PeftModel``) and the functional core
(``add_adapter``, ``save_adapter``, ``load_adapter``, ``merge``, …) are imported lazily so that
``import lorakit`` and ``lorakit --help`` stay instant; torch loads on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from lorakit._lazy import lazy_exports

if TYPE_CHECKING:  # the lazy table below, for type checkers and editors (tests/test_lazy_exports.py)
    from lorakit.adapter_io import load_adapter as load_adapter, save_adapter as save_adapter
    from lorakit.adapters.config import LoraConfig as LoraConfig
    from lorakit.adapters.quant import quantize_model as quantize_model
    from lorakit.compat import PeftModel as PeftModel, get_peft_model as get_peft_model
    from lorakit.errors import LorakitError as LorakitError
    from lorakit.inject import (
        add_adapter as add_adapter, delete_adapter as delete_adapter, disable as disable, disabled as disabled,
        enable as enable, parameter_counts as parameter_counts, set_active as set_active, set_enabled as set_enabled,
        trainable_parameters as trainable_parameters,
    )
    from lorakit.merged_folder import merge_to_folder as merge_to_folder
    from lorakit.merging import (
        merge as merge, merge_and_unload as merge_and_unload, unload as unload, unmerge as unmerge,
    )

__version__ = "0.1.0"

_LAZY = {
    "LorakitError": "lorakit.errors",
    "LoraConfig": "lorakit.adapters.config",
    "get_peft_model": "lorakit.compat",
    "PeftModel": "lorakit.compat",
    "add_adapter": "lorakit.inject",
    "delete_adapter": "lorakit.inject",
    "set_active": "lorakit.inject",
    "disable": "lorakit.inject",
    "enable": "lorakit.inject",
    "disabled": "lorakit.inject",
    "set_enabled": "lorakit.inject",
    "parameter_counts": "lorakit.inject",
    "trainable_parameters": "lorakit.inject",  # the first name of parameter_counts
    "save_adapter": "lorakit.adapter_io",
    "load_adapter": "lorakit.adapter_io",
    "merge": "lorakit.merging",
    "unmerge": "lorakit.merging",
    "merge_and_unload": "lorakit.merging",
    "unload": "lorakit.merging",
    "merge_to_folder": "lorakit.merged_folder",
    "quantize_model": "lorakit.adapters.quant",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_exports(__name__, _LAZY)
