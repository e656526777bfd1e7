"""Shared pieces of the config package: errors with key paths, scalar types, the base model, file reading.

Every block model (random-LTD, LayerToken LR, SkipLayer, HadSkip) derives from :class:`_Block`, so a bad value is
reported the same way everywhere: a :class:`ConfigError` whose message holds the full dotted key path.
"""

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, ClassVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

__all__ = ["RANDOM_LTD_PATH", "ConfigError", "ConfigIssue"]

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


Int = Annotated[int, BeforeValidator(_as_int)]
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
                    hint = f" ({_KEY_HINTS[key]})" if key in _KEY_HINTS else ""
                    problems.append((str(key), f"unknown key {key!r}{hint}; allowed keys: {', '.join(allowed)}"))
            if problems:
                raise _FieldIssues(*problems)
        return data


# --------------------------------------------------------------------------------------------------------------------
# DeepSpeed-config helpers
# --------------------------------------------------------------------------------------------------------------------


def _load_deepspeed_config(ds_config: dict[str, Any] | str | os.PathLike[str]) -> dict[str, Any]:
    """A DeepSpeed config as a dict: given as a dict, or read from a JSON file."""
    if isinstance(ds_config, (str, os.PathLike)):
        path = os.fspath(ds_config)
        with open(path, encoding="utf-8") as fh:
            try:
                ds_config = json.load(fh)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(ds_config, dict):
        raise ConfigError(f"a DeepSpeed config must be a JSON object / dict, got {type(ds_config).__name__}")
    return ds_config


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
