"""Shared pieces of the config package: errors with key paths, scalar types, the base model, file reading.

Every block model (random-LTD, LayerToken LR, SkipLayer, HadSkip) derives from :class:`_Block`, so a bad value is
reported the same way everywhere: a :class:`ConfigError` whose message holds the full dotted key path.
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import contextvars
import difflib
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

import hjson
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

from random_ltd.seeds import SEED_MAX, SEED_MIN, check_seed

__all__ = ["MAX_LAYERS", "RANDOM_LTD_PATH", "ConfigError", "ConfigIssue", "load_deepspeed_config", "read_config_file"]

RANDOM_LTD_PATH = "data_efficiency.data_routing.random_ltd"
"""Dotted key path of the random-LTD block inside a DeepSpeed config."""


_KEY_HINTS = {
    "global_batch_size": "DeepSpeed's engine injects it into its own parsed copy; pass the batch size to the "
    "schedule instead",
    "micro_batch_size": "DeepSpeed's engine injects it into its own parsed copy; do not write it in the config",
}


# --------------------------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConfigIssue:
    """One problem in a config: full dotted key path and a message saying what is wrong and what is allowed."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}"


class ConfigError(ValueError):
    """Invalid random-LTD / LayerToken LR configuration.

    ``str(err)`` holds every issue as ``<full.dotted.key.path>: <bad value and what is allowed>``; ``err.issues``
    has them as :class:`ConfigIssue` objects.
    """

    def __init__(self, issues: list[ConfigIssue] | str) -> None:
        if isinstance(issues, str):
            issues = [ConfigIssue(path="", message=issues)]
        self.issues: list[ConfigIssue] = list(issues)
        if len(self.issues) == 1:
            text = str(self.issues[0]) if self.issues[0].path else self.issues[0].message
        else:
            text = f"{len(self.issues)} config errors:\n" + "\n".join(f"  {issue}" for issue in self.issues)
        super().__init__(text)

    @classmethod
    def from_validation_error(cls, exc: ValidationError, prefix: str) -> ConfigError:
        """Convert a pydantic ``ValidationError`` into a ConfigError whose paths start with ``prefix``."""
        issues: list[ConfigIssue] = []
        for err in exc.errors():
            loc = list(err.get("loc", ()))
            cause = (err.get("ctx") or {}).get("error")
            if isinstance(cause, _FieldIssues):
                for field, message in cause.items:
                    issues.append(ConfigIssue(_join_path(prefix, [*loc, *field.split(".")]), message))
                continue
            if err["type"] == "missing":
                message = "required key is missing"
            elif isinstance(cause, ValueError):
                message = str(cause)
            else:
                message = f"{err['msg']} (got {err.get('input')!r})"
            issues.append(ConfigIssue(_join_path(prefix, loc), message))
        return cls(issues)


class _FieldIssues(ValueError):
    """Raised inside validators to report problems at sub-paths (relative to the validated model)."""

    def __init__(self, *items: tuple[str, str]) -> None:
        self.items = list(items)
        super().__init__("; ".join(f"{field}: {message}" for field, message in items))


def _join_path(prefix: str, loc: list[Any]) -> str:
    """Dotted path ``prefix.a.b[3]`` from a pydantic ``loc``."""
    path = prefix
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            path += " (key)"
        elif part:
            path = f"{path}.{part}" if path else str(part)
    return path


# --------------------------------------------------------------------------------------------------------------------
# Scalar types
# --------------------------------------------------------------------------------------------------------------------


def _as_int(value: Any) -> Any:
    """Accept ints and integral floats (JSON ``2e6``); reject bools and strings, which DeepSpeed would mis-handle."""
    if isinstance(value, bool):
        raise ValueError(f"expected an integer, got boolean {value!r}")
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    raise ValueError(f"expected an integer, got {type(value).__name__} {value!r}")


def _as_layer_key(value: Any) -> Any:
    """Layer-id dict keys: ints, or decimal strings (JSON object keys are always strings)."""
    if isinstance(value, str) and value.strip().lstrip("-").isdigit():
        return int(value)
    return _as_int(value)


def _as_real(value: Any) -> Any:
    """Accept finite ints/floats; reject bools, strings, nan and inf."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"expected a number, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"expected a finite number, got {value!r}")
    return float(value)


def _as_seed(value: Any) -> int:
    """A sampling seed outside a model field: an integer in [0, 2**63 - 1] (``random_ltd.seeds``)."""
    return check_seed(_as_int(value))


MAX_LAYERS = 2**16
"""Upper bound of every layer count and layer id (``total_layer_num``, ``num_layers``, ids): far above any real
model (GPT-3 175B has 96 layers), small enough that default layer lists and their checks stay cheap, and, times up
to 2**16 sequence-parallel shards, inside the sampler's 32-bit layer counter."""


def _duplicates(values: list[int]) -> list[int]:
    """The values given more than once, sorted (linear time: configs may list many layers)."""
    return sorted(value for value, n in collections.Counter(values).items() if n > 1)


def _brief(values: list[int], limit: int = 16) -> str:
    """A list for an error message, shortened when long."""
    if len(values) <= limit:
        return str(values)
    return f"[{', '.join(map(str, values[:limit]))}, ...] ({len(values)} values)"


Int = Annotated[int, BeforeValidator(_as_int)]
Seed = Annotated[Int, Field(ge=SEED_MIN, le=SEED_MAX)]
"""A sampling seed in [0, 2**63 - 1] (``random_ltd.seeds``): larger ones would alias smaller ones."""
LayerKey = Annotated[int, BeforeValidator(_as_layer_key)]
Real = Annotated[float, BeforeValidator(_as_real)]
KeepRatio = Annotated[Real, Field(gt=0.0, le=1.0)]


# --------------------------------------------------------------------------------------------------------------------
# Base model
# --------------------------------------------------------------------------------------------------------------------


_VALIDATION_DEPTH: contextvars.ContextVar[int] = contextvars.ContextVar("random_ltd_config_depth", default=0)


@contextlib.contextmanager
def _converting_errors(prefix: str) -> Iterator[None]:
    """Turn a pydantic ValidationError into ConfigError, only at the outermost call.

    Models with a custom ``__init__`` are validated through it even when nested, and pydantic merges a nested
    ValidationError into the parent's with the right location; converting there would lose that, so nested calls
    pass ValidationError through untouched.
    """
    depth = _VALIDATION_DEPTH.get()
    token = _VALIDATION_DEPTH.set(depth + 1)
    try:
        yield
    except ValidationError as exc:
        if depth:
            raise
        raise ConfigError.from_validation_error(exc, prefix) from None
    finally:
        _VALIDATION_DEPTH.reset(token)


class _Block(BaseModel):
    """Frozen, extra="forbid" base that converts validation failures into :class:`ConfigError`."""

    model_config = ConfigDict(extra="forbid", frozen=True, validate_default=False)

    _path: ClassVar[str] = RANDOM_LTD_PATH

    def __init__(self, **data: Any) -> None:
        with _converting_errors(type(self)._path):
            super().__init__(**data)

    @classmethod
    def model_validate(cls, obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: D102 - same as pydantic's
        with _converting_errors(cls._path):
            return super().model_validate(obj, *args, **kwargs)

    @classmethod
    def model_validate_json(cls, json_data: str | bytes | bytearray, *args: Any, **kwargs: Any) -> Any:  # noqa: D102
        with _converting_errors(cls._path):
            return super().model_validate_json(json_data, *args, **kwargs)

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_keys(cls, data: Any) -> Any:
        """Unknown keys are errors naming the key and listing the allowed ones (DeepSpeed ignores typos)."""
        if isinstance(data, dict):
            allowed = list(cls.model_fields)
            problems = []
            for key in data:
                if key not in cls.model_fields:
                    close = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.8)
                    hint = f" ({_KEY_HINTS[key]})" if key in _KEY_HINTS else \
                        f" (did you mean {close[0]!r}?)" if close else ""
                    problems.append((str(key), f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"))
            if problems:
                raise _FieldIssues(*problems)
        return data


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed-config helpers
# --------------------------------------------------------------------------------------------------------------------


def read_config_file(path: str | os.PathLike[str]) -> Any:
    """Parse a config file the way ``deepspeed.initialize`` does: Hjson (JSON plus ``//``, ``#`` and ``/* */``
    comments, optional commas and quotes), and a key given twice in one object is an error (DeepSpeed raises
    "Duplicate keys in DeepSpeed config"; plain ``json.load`` would silently keep the last one).

    Raises:
        ConfigError: naming the file: missing, a directory, unreadable, not UTF-8, not valid JSON/Hjson, or with
            duplicate keys (each named by its dotted key path).
    """
    name = os.fspath(path)
    try:
        with open(name, encoding="utf-8") as fh:
            text = fh.read()
    except FileNotFoundError:
        raise ConfigError(f"{name}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{name}: is a directory, expected a JSON config file") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{name}: not a UTF-8 text file (byte {exc.start}: {exc.reason}); expected a JSON "
                          f"config file") from None
    except OSError as exc:
        raise ConfigError(f"{name}: cannot read the config file ({exc.strerror or exc})") from None
    return _parse_config_text(text, name)


def _parse_config_text(text: str, source: str) -> Any:
    """Hjson text -> plain dicts/lists; duplicate keys are a ConfigError naming ``source`` and each key path."""
    try:
        parsed = hjson.loads(text, object_pairs_hook=_ParsedObject.from_pairs)
    except hjson.HjsonDecodeError as exc:
        raise ConfigError(f"{source}: not valid JSON ({exc})") from None
    issues: list[ConfigIssue] = []
    plain = _plain(parsed, "", issues, source)
    if issues:
        raise ConfigError(issues)
    return plain


class _ParsedObject(dict):
    """A parsed JSON object that remembers which of its keys were given more than once."""

    duplicates: dict[str, int]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _ParsedObject:
        obj = cls(pairs)
        obj.duplicates = {}
        if len(obj) != len(pairs):
            counts = collections.Counter(key for key, _ in pairs)
            obj.duplicates = {key: n for key, n in counts.items() if n > 1}
        return obj


def _plain(value: Any, path: str, issues: list[ConfigIssue], source: str) -> Any:
    """Convert parsed objects to plain dicts, collecting one issue per duplicated key (with its dotted path)."""
    if isinstance(value, _ParsedObject):
        for key, n in value.duplicates.items():
            issues.append(ConfigIssue(_join_path(path, [key]), f"given {n} times in one object of {source}; a key may "
                                      f"appear once (deepspeed.initialize rejects duplicate keys)"))
        return {key: _plain(v, _join_path(path, [key]), issues, source) for key, v in value.items()}
    if isinstance(value, list):
        return [_plain(v, f"{path}[{i}]", issues, source) for i, v in enumerate(value)]
    return value


def load_deepspeed_config(config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A whole DeepSpeed config as a dict: a dict as given, or a file read like DeepSpeed does.

    A string that names no file is, as in DeepSpeed, tried as a base64-encoded config (``--deepspeed_config`` may
    carry one); see :func:`read_config_file` for what a file may hold.

    Raises:
        ConfigError: the file cannot be read or parsed, has duplicate keys, or the config is not a JSON object.
    """
    if isinstance(config, (str, os.PathLike)):
        name = os.fspath(config)
        decoded = _base64_config(name) if isinstance(config, str) and not os.path.exists(name) else None
        config = decoded if decoded is not None else read_config_file(name)
        source = name
    else:
        source = "the DeepSpeed config"
    if not isinstance(config, dict):
        raise ConfigError(f"{source}: a DeepSpeed config must be a JSON object / dict, got {type(config).__name__}")
    return config


def _base64_config(text: str) -> dict[str, Any] | None:
    """The config a base64 string encodes (DeepSpeed accepts these in place of a path), or None if it is not one."""
    try:
        decoded = base64.urlsafe_b64decode(text).decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    try:
        parsed = hjson.loads(decoded, object_pairs_hook=_ParsedObject.from_pairs)
    except hjson.HjsonDecodeError:
        return None
    if not isinstance(parsed, dict):
        return None
    return _parse_config_text(decoded, "the base64-encoded DeepSpeed config")


def _sub_block(parent: dict[str, Any], key: str, parent_path: str) -> dict[str, Any]:
    """``parent[key]`` as a dict ({} when absent); a non-object is a ConfigError."""
    value = parent.get(key, {})
    if not isinstance(value, dict):
        path = f"{parent_path}.{key}" if parent_path else key
        raise ConfigError([ConfigIssue(path, f"expected an object, got {value!r}")])
    return value


def _flag(block: dict[str, Any], path: str, default: bool) -> bool:
    """A parent ``enabled`` flag: must be a JSON boolean."""
    value = block.get("enabled", default)
    if not isinstance(value, bool):
        raise ConfigError([ConfigIssue(f"{path}.enabled", f"expected true or false, got {value!r}")])
    return value
