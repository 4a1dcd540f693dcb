"""Base models: resolve a spec ``M`` to a local folder, and load it with transformers.

- :mod:`~lorakit.models.resolution`: ``M`` (a built-in alias, a local folder, a ``.gguf`` file or
  a hub id in the local Hugging Face cache) → a folder with ``config.json`` and safetensors
  weights, offline, converting a GGUF file once (:func:`resolve`, :func:`gguf_source`,
  :data:`ALIASES`, :func:`cache_dir`);
- :mod:`~lorakit.models.loading`: the config, the model and the tokenizer of ``M`` through
  transformers (:func:`load_model_config`, :func:`load_model`, :func:`load_tokenizer`,
  :func:`default_dtype`).

The public names keep their old path, ``lorakit.models.<name>`` (the package was one module before
#17), and so do the private helpers other modules and tests use. Importing this package imports
neither torch nor transformers.
"""

from lorakit.models.loading import default_dtype, load_config, load_model, load_model_config, load_tokenizer
from lorakit.models.resolution import ALIASES, MARKER, Alias, cache_dir, gguf_source, resolve

# Private helpers at their old path, for code and tests written against the one module.
from lorakit.models.loading import _parse_dtype as _parse_dtype
from lorakit.models.resolution import _alias_gguf as _alias_gguf, _alias_identity as _alias_identity, _locate as _locate

__all__ = ["ALIASES", "MARKER", "Alias", "cache_dir", "default_dtype", "gguf_source", "load_config", "load_model",
           "load_model_config", "load_tokenizer", "resolve"]
