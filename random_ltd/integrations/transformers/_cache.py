"""Where a Hugging Face layer call carries its KV cache, under every name transformers has used for it.

transformers renamed the per-layer cache argument several times: ``layer_past`` (GPT-2 in 4.x), ``past_key_value``
(most 4.x layers), ``past_key_values`` (5.0-5.23) and ``cache`` (5.24+, the old names deprecated; Mamba-style layers
also had ``cache_params``). The adapters look under all of them, by keyword and by position, so their checks (a filled
cache in training) and the SkipLayer's cache updates keep working across releases.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

__all__ = ["CACHE_NAMES", "cache_length", "find_cache"]

#: every name of the per-layer KV-cache argument, newest first
CACHE_NAMES = ("cache", "past_key_values", "past_key_value", "layer_past", "cache_params")


def find_cache(arguments: Mapping[str, Any]) -> Any:
    """The first non-None cache among ``arguments`` (a bound call's arguments, whose ``"kwargs"`` entry, if a dict,
    holds the ``**kwargs``), or None."""
    extra = arguments.get("kwargs")
    for source in (arguments, extra if isinstance(extra, Mapping) else {}):
        for name in CACHE_NAMES:
            if source.get(name) is not None:
                return source[name]
    return None


def cache_length(cache: Any, layer_idx: int) -> int:
    """Tokens already in this layer's KV cache (a ``Cache`` object, or a 4.x per-layer legacy ``(k, v)`` tuple)."""
    if cache is None:
        return 0
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length(layer_idx))
    if isinstance(cache, (tuple, list)) and cache and isinstance(cache[0], torch.Tensor):
        return int(cache[0].shape[-2])
    return 0
