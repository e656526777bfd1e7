"""The one range of sampling seeds, shared by the config, ``RandomLTDState`` and the sampler.

The sampler's key is 64 bits and the per-rank derivation keeps 63, so a seed outside ``[SEED_MIN, SEED_MAX]`` would
alias a smaller one (``2**63`` and ``2**64`` acted as 0, ``2**64 + 1234`` as 1234): such seeds are refused.
"""

from __future__ import annotations

__all__ = ["SEED_MAX", "SEED_MIN", "check_seed"]

SEED_MIN = 0
"""Smallest accepted seed."""

SEED_MAX = 2**63 - 1
"""Largest accepted seed (the sampler's steps share this range)."""


def check_seed(seed: object, name: str = "seed") -> int:
    """``seed`` itself if it is an int in ``[SEED_MIN, SEED_MAX]``.

    Raises:
        TypeError: not an int (bools are refused).
        ValueError: outside the range (the message names ``name`` and the range).
    """
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise TypeError(f"{name} must be an int in [0, 2**63 - 1], got {type(seed).__name__} ({seed!r})")
    if not SEED_MIN <= seed <= SEED_MAX:
        raise ValueError(f"{name} must be in [0, 2**63 - 1] = [{SEED_MIN}, {SEED_MAX}] (larger seeds would alias "
                         f"smaller ones), got {seed}")
    return seed
