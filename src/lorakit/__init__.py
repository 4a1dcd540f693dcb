"""lorakit: LoRA fine-tuning from data set to evaluated, merged, combined or served adapter.

The PEFT-style names (``LoraConfig``, ``get_peft_model``, ``PeftModel``) and the functional core
(``add_adapter``, ``save_adapter``, ``load_adapter``, ``merge``, …) are imported lazily so that
``import lorakit`` and ``lorakit --help`` stay instant; torch loads on first use.
"""

from __future__ import annotations

from lorakit._lazy import lazy_exports

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
    "trainable_parameters": "lorakit.inject",
    "save_adapter": "lorakit.adapter_io",
    "load_adapter": "lorakit.adapter_io",
    "merge": "lorakit.merging",
    "unmerge": "lorakit.merging",
    "merge_and_unload": "lorakit.merging",
    "unload": "lorakit.merging",
    "quantize_model": "lorakit.adapters.quant",
}

__all__ = ["__version__", *_LAZY]


__getattr__ = lazy_exports(__name__, _LAZY)
