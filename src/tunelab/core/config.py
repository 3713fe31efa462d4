"""Map recipe sections onto the libraries' own config classes.

A recipe section such as ``training:`` is the keyword arguments of a library
class (``trl.SFTConfig``, ``peft.LoraConfig``, ``transformers.BitsAndBytesConfig``,
``transformers.GenerationConfig``...). We read the accepted names and their
types from the class itself, so there is no parallel vocabulary to drift:

- an unknown key is reported with the closest valid name;
- values are checked against the field's annotation, and the few lossless
  conversions YAML needs are made (``1e-4`` is a *string* in YAML 1.1);
- the class is then built, and its own ``__post_init__`` checks run, with any
  error turned into one line.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
import re
import types
import typing
from typing import Any

from tunelab.core.errors import TunelabError, unknown_key

_MISSING = object()


def accepted_fields(cls: type) -> dict[str, Any]:
    """Field name -> type annotation for the keyword arguments `cls` accepts."""
    if dataclasses.is_dataclass(cls) and _generated_init(cls):
        hints = _type_hints(cls)
        return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls) if f.init}
    params = inspect.signature(cls.__init__).parameters
    hints = _type_hints(cls.__init__)
    return {
        name: hints.get(name, Any)
        for name, p in params.items()
        if name != "self" and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
    }


def _generated_init(cls: type) -> bool:
    """True when `cls.__init__` is the one @dataclass wrote (its fields are its arguments).

    Some library dataclasses (BitsAndBytesConfig) keep a hand-written __init__ instead.
    """
    code = getattr(cls.__init__, "__code__", None)
    return code is not None and code.co_filename.startswith("<")


def _type_hints(obj: Any) -> dict[str, Any]:
    try:
        return typing.get_type_hints(obj)
    except Exception:  # unresolved forward references: fall back to raw annotations
        return {k: (v if not isinstance(v, str) else Any) for k, v in getattr(obj, "__annotations__", {}).items()}


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is typing.Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return "one of " + ", ".join(str(m.value) for m in tp)
    if origin is not None:
        return getattr(origin, "__name__", str(origin))
    return getattr(tp, "__name__", str(tp))


def coerce(value: Any, tp: Any, where: str) -> Any:
    """Return `value` converted to annotation `tp`, or raise a one-line TunelabError."""
    result = _coerce(value, tp)
    if result is _MISSING:
        raise TunelabError(f"'{where}' is {value!r} ({type(value).__name__}); expected {_describe(tp)}")
    return result


def _coerce(value: Any, tp: Any) -> Any:  # noqa: C901 - one branch per kind of annotation
    if tp is Any or tp is object or isinstance(tp, (str, typing.TypeVar)):
        return value
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        # Exact matches first, so `int | str` keeps 5 an int and "5" a str.
        for arg in args:
            if _is_instance(value, arg):
                return _coerce(value, arg)
        for arg in args:
            result = _coerce(value, arg)
            if result is not _MISSING:
                return result
        return _MISSING
    if origin is typing.Literal:
        return value if value in typing.get_args(tp) else _MISSING
    if tp is type(None):
        return None if value is None else _MISSING
    if origin in (list, tuple, set, typing.Sequence, typing.Iterable) or tp in (list, tuple):
        if not isinstance(value, list):
            return _MISSING
        args = typing.get_args(tp)
        if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
            if len(value) != len(args):  # tuple[int, int]: one item per position
                return _MISSING
            items = [_coerce(v, a) for v, a in zip(value, args, strict=True)]
        elif args:  # list[str], tuple[str, ...]
            items = [_coerce(v, args[0]) for v in value]
        else:
            return value
        return _MISSING if any(i is _MISSING for i in items) else items
    if origin is dict or tp is dict:
        return value if isinstance(value, dict) else _MISSING
    if tp is bool:
        return value if isinstance(value, bool) else _MISSING
    if tp is int:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                try:
                    f = float(value)  # "1e3"
                    return int(f) if f.is_integer() else _MISSING
                except ValueError:
                    return _MISSING
        return _MISSING
    if tp is float:
        if isinstance(value, bool):
            return _MISSING
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                return _MISSING
        return _MISSING
    if tp is str:
        return value if isinstance(value, str) else _MISSING
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        if isinstance(value, tp):
            return value
        values = [m.value for m in tp]
        if isinstance(value, bool):  # YAML 1.1 reads `save_strategy: no` as False
            value = {False: "no", True: "yes"}[value]
        return value if value in values else _MISSING
    if isinstance(tp, type):
        # A class we cannot build from YAML (a tokenizer, a callable...): only exact instances.
        return value if isinstance(value, tp) or value is None else _MISSING
    return value


def _is_instance(value: Any, tp: Any) -> bool:
    if tp is Any:
        return False
    if tp is type(None):
        return value is None
    if tp is float:
        return isinstance(value, float)
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if isinstance(tp, type) and not issubclass(tp, enum.Enum):
        return isinstance(value, tp)
    return False


def check_keys(values: dict[str, Any], cls: type, where: str, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
    """Check names and types of `values` against `cls`'s fields; return them coerced."""
    if not isinstance(values, dict):
        raise TunelabError(f"'{where}' must be a mapping of {cls.__name__} fields, not {values!r}")
    fields = accepted_fields(cls)
    source = f"{cls.__module__.split('.')[0]}.{cls.__name__}"
    out = {}
    for key, value in values.items():
        if key in exclude:
            raise TunelabError(f"'{where}.{key}' is set by tunelab; remove it from the recipe")
        if key not in fields:
            raise unknown_key(where, key, [f for f in fields if f not in exclude], f"not a field of {source}")
        out[key] = coerce(value, fields[key], f"{where}.{key}")
        choices = _choices(cls).get(key)
        if choices and out[key] not in choices:
            raise TunelabError(f"'{where}.{key}' is {value!r}; expected one of {', '.join(map(str, choices))}")
    return out


def _choices(cls: type) -> dict[str, list[Any]]:
    """Allowed values declared in dataclass field metadata (TRL and transformers use `choices`)."""
    if not dataclasses.is_dataclass(cls):
        return {}
    return {f.name: list(f.metadata["choices"]) for f in dataclasses.fields(cls) if f.metadata.get("choices")}


def build(
    cls: type, values: dict[str, Any], where: str, fixed: dict[str, Any] | None = None, exclude: tuple[str, ...] = ()
) -> Any:
    """Instantiate `cls` from a recipe section, turning its own validation errors into one line."""
    kwargs = check_keys(values if values is not None else {}, cls, where, exclude=exclude)
    check_numbers(kwargs, cls, where)
    kwargs.update(fixed or {})
    try:
        return cls(**kwargs)
    except ImportError as exc:  # importlib.metadata.PackageNotFoundError too: a feature needs a package
        raise missing_package(exc, kwargs, where) from None
    except (ValueError, TypeError, AssertionError, KeyError) as exc:
        raise TunelabError(f"'{where}' is rejected by {cls.__name__}: {_message(exc)}") from None
    except Exception as exc:
        # Validators of huggingface_hub's strict dataclasses (transformers configs) wrap the
        # config's own ValueError; anything else the class raises on these values is about them.
        cause = exc.__cause__ if isinstance(exc.__cause__, (ValueError, TypeError, AssertionError)) else exc
        if cause is exc and type(exc).__module__.split(".")[0] not in ("huggingface_hub", "transformers"):
            raise
        raise TunelabError(f"'{where}' is rejected by {cls.__name__}: {_message(cause)}") from None


def _message(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400] or type(exc).__name__


EXTRAS = {"deepspeed": "tunelab[deepspeed]", "bitsandbytes": "tunelab[quant]", "diffusers": "tunelab[diffusion]"}


def missing_package(exc: ImportError, values: dict[str, Any], where: str) -> TunelabError:
    """One line for a library class that needs a package this environment lacks (deepspeed, ...)."""
    text = _message(exc)
    found = re.search(r"'([A-Za-z][\w.-]*?)(?:[<>=!~ ].*?)?'", text) or re.search(r"named '([\w.-]+)'", text)
    name = getattr(exc, "name", None)
    package = found.group(1) if found else name if isinstance(name, str) and name.isidentifier() else ""
    package = package.split(".")[0]
    if not package:
        return TunelabError(f"'{where}' needs a package that is not installed ({text})")
    key = next((k for k in values if k == package or package in k), None)
    setting = f"'{where}.{key}'" if key else f"'{where}'"
    drop = f", or remove `{key}:`" if key else ""
    return TunelabError(
        f"{setting} needs the `{package}` package, which is not installed: "
        f"pip install '{EXTRAS.get(package, package)}'{drop}"
    )


# Numbers that count or size things, and rates: never negative. A negative default (max_steps: -1)
# is a sentinel and stays accepted.
_COUNTS = re.compile(
    r"^(num_|max_|min_)|(_steps|_epochs|batch_size|_size|_length|_limit|_workers|_rate|_ratio|_dropout|_epsilon)$"
    r"|^(learning_rate|weight_decay|r|lora_alpha|vocab_size|gradient_accumulation_steps)$"
)
_POSITIVE = re.compile(r"(batch_size|_accumulation_steps)$|^r$")


def check_numbers(values: dict[str, Any], cls: type, where: str) -> None:
    """Finite numbers everywhere; counts, sizes and rates not negative (batch sizes, LoRA r: positive)."""
    defaults = _defaults(cls)
    for key, value in values.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if isinstance(value, float) and not math.isfinite(value):
            raise TunelabError(f"'{where}.{key}' is {value}: set it to a finite number")
        default = defaults.get(key)
        sentinel = isinstance(default, (int, float)) and not isinstance(default, bool) and default < 0
        if _POSITIVE.search(key) and value <= 0:
            raise TunelabError(f"'{where}.{key}' is {value}: set it to a positive number (1 or more)")
        if _COUNTS.search(key) and value < 0 and not (sentinel and value == default):
            also = f" (or {default}, its default)" if sentinel else ""
            raise TunelabError(f"'{where}.{key}' is {value}, a negative number: set it to 0 or more{also}")


def _defaults(cls: type) -> dict[str, Any]:
    if dataclasses.is_dataclass(cls):
        return {f.name: f.default for f in dataclasses.fields(cls) if f.default is not dataclasses.MISSING}
    try:
        params = inspect.signature(cls.__init__).parameters
    except (TypeError, ValueError):
        return {}
    return {name: p.default for name, p in params.items() if p.default is not inspect.Parameter.empty}
