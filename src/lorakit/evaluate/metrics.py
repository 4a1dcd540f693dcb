"""Generation metrics: pure functions of (prediction, reference) -> score in [0, 1].

| name               | a prediction scores 1 when                                              |
|--------------------|-------------------------------------------------------------------------|
| `exact_match`      | it equals the reference after stripping surrounding whitespace          |
| `normalized_match` | equal after SQuAD normalisation (case, punctuation, a/an/the, spaces)   |
| `contains`         | the normalised reference occurs in the normalised prediction            |
| `json_valid`       | the whole prediction parses as JSON (no code fences, no trailing text)  |
| `json_schema`      | it parses and satisfies the given JSON schema                           |
| `module:function`  | the user's ``function(prediction, reference)`` returns a number / bool  |

The schema check implements the common core of JSON Schema (``type``, ``enum``, ``const``,
``properties``, ``required``, ``additionalProperties``, ``items``, ``minItems``/``maxItems``,
``minLength``/``maxLength``, ``pattern``, ``minimum``/``maximum``) without a dependency.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import json
import re
import string
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from lorakit.errors import LorakitError

Metric = Callable[[str, str], float]
BUILTIN = ("exact_match", "normalized_match", "contains", "json_valid")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """SQuAD's answer normalisation: lower case, no punctuation, no articles, single spaces."""
    text = _ARTICLES.sub(" ", text.lower().translate(_PUNCTUATION))
    return " ".join(text.split())


def exact_match(prediction: str, reference: str) -> float:
    return float(prediction.strip() == reference.strip())


def normalized_match(prediction: str, reference: str) -> float:
    return float(normalize(prediction) == normalize(reference))


def contains(prediction: str, reference: str) -> float:
    return float(normalize(reference) in normalize(prediction))


def parse_json(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when the whole of ``text`` is one JSON value."""
    try:
        return True, json.loads(text.strip())
    except (json.JSONDecodeError, RecursionError):
        return False, None


def json_valid(prediction: str, reference: str = "") -> float:
    return float(parse_json(prediction)[0])


def looks_like_json(references: list[str]) -> bool:
    """Whether most references are JSON objects or arrays (then ``json_valid`` is reported by default)."""
    hits = sum(1 for r in references if parse_json(r)[0] and isinstance(parse_json(r)[1], (dict, list)))
    return bool(references) and hits >= len(references) / 2


# -- JSON schema --------------------------------------------------------------------------------

_TYPES: dict[str, Callable[[Any], bool]] = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: dict, path: str = "$") -> list[str]:
    """Why ``value`` does not satisfy ``schema`` (empty list: it does)."""
    errors: list[str] = []
    kind = schema.get("type")
    if kind is not None:
        kinds = kind if isinstance(kind, list) else [kind]
        if not any(_TYPES.get(k, lambda v: False)(value) for k in kinds):
            return [f"{path}: expected {'/'.join(kinds)}, got {type(value).__name__}"]
    if "enum" in schema and value not in schema["enum"]:
        errors.append(f"{path}: {value!r} not in {schema['enum']}")
    if "const" in schema and value != schema["const"]:
        errors.append(f"{path}: expected {schema['const']!r}")
    if isinstance(value, dict):
        properties = schema.get("properties", {})
        errors += [f"{path}: missing {key!r}" for key in schema.get("required", []) if key not in value]
        for key, item in value.items():
            if key in properties:
                errors += schema_errors(item, properties[key], f"{path}.{key}")
            elif schema.get("additionalProperties") is False:
                errors.append(f"{path}: unexpected key {key!r}")
            elif isinstance(schema.get("additionalProperties"), dict):
                errors += schema_errors(item, schema["additionalProperties"], f"{path}.{key}")
    if isinstance(value, list):
        if "items" in schema:
            for i, item in enumerate(value):
                errors += schema_errors(item, schema["items"], f"{path}[{i}]")
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", float("inf")):
            errors.append(f"{path}: {len(value)} items outside [{schema.get('minItems', 0)}, {schema.get('maxItems', '∞')}]")
    if isinstance(value, str):
        if len(value) < schema.get("minLength", 0) or len(value) > schema.get("maxLength", float("inf")):
            errors.append(f"{path}: length {len(value)} outside the allowed range")
        if "pattern" in schema and not re.search(schema["pattern"], value):
            errors.append(f"{path}: does not match {schema['pattern']!r}")
    if _TYPES["number"](value):
        if value < schema.get("minimum", float("-inf")) or value > schema.get("maximum", float("inf")):
            errors.append(f"{path}: {value} outside [{schema.get('minimum', '-∞')}, {schema.get('maximum', '∞')}]")
    return errors


def load_schema(path: str | Path) -> dict:
    """Read a JSON schema file."""
    path = Path(path)
    if not path.is_file():
        raise LorakitError(f"JSON schema file {path} does not exist")
    try:
        schema = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise LorakitError(f"{path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    if not isinstance(schema, dict):
        raise LorakitError(f"{path}: a JSON schema is an object, got {type(schema).__name__}")
    return schema


def schema_metric(schema: dict) -> Metric:
    def json_schema(prediction: str, reference: str = "") -> float:
        ok, value = parse_json(prediction)
        return float(ok and not schema_errors(value, schema))

    return json_schema


# -- user functions -----------------------------------------------------------------------------


def load_user_metric(spec: str) -> tuple[str, Metric]:
    """``module:function`` or ``path/to/file.py:function`` -> (name, function).

    The function is called as ``function(prediction, reference)`` and returns a number or a bool
    (mean over examples is reported).

    Raises:
        LorakitError: the module cannot be imported, has no such function, or it takes fewer than
            two arguments.
    """
    module_name, sep, func_name = spec.rpartition(":")
    if not sep or not module_name or not func_name:
        raise LorakitError(f"metric {spec!r}: expected MODULE:FUNCTION or FILE.py:FUNCTION")
    try:
        if module_name.endswith(".py") or "/" in module_name:
            path = Path(module_name)
            if not path.is_file():
                raise LorakitError(f"metric {spec!r}: file {path} does not exist")
            loader_spec = importlib.util.spec_from_file_location(f"lorakit_user_metric_{path.stem}", path)
            module = importlib.util.module_from_spec(loader_spec)
            loader_spec.loader.exec_module(module)
        else:
            sys.path.insert(0, str(Path.cwd()))
            try:
                module = importlib.import_module(module_name)
            finally:
                sys.path.remove(str(Path.cwd()))
    except LorakitError:
        raise
    except Exception as err:  # the user's module failed to import: show why
        raise LorakitError(f"metric {spec!r}: importing {module_name} failed: {type(err).__name__}: {err}") from None
    func = getattr(module, func_name, None)
    if not callable(func):
        raise LorakitError(f"metric {spec!r}: {module_name} has no function {func_name!r}")
    try:
        inspect.signature(func).bind("prediction", "reference")
    except TypeError:
        raise LorakitError(f"metric {spec!r}: {func_name} must accept (prediction, reference)") from None
    except ValueError:
        pass  # builtins without a signature
    return func_name, func


def score(name: str, func: Metric, prediction: str, reference: str, where: str) -> float:
    """``func(prediction, reference)`` as a float; a failure names the metric and the example."""
    try:
        value = func(prediction, reference)
    except Exception as err:
        raise LorakitError(f"metric {name!r} raised {type(err).__name__}: {err} on {where} "
                           f"(prediction {prediction[:60]!r})") from None
    if isinstance(value, bool):
        return float(value)
    if not isinstance(value, (int, float)):
        raise LorakitError(f"metric {name!r} returned {type(value).__name__} on {where}; expected a number or bool")
    return float(value)


def builtin_metrics(names: list[str]) -> dict[str, Metric]:
    table = {"exact_match": exact_match, "normalized_match": normalized_match, "contains": contains,
             "json_valid": json_valid}
    unknown = [n for n in names if n not in table]
    if unknown:
        raise LorakitError(f"unknown metric {unknown[0]!r}; built-in metrics: {', '.join(BUILTIN)} "
                           "(add your own with --metric module:function)")
    return {n: table[n] for n in names}
