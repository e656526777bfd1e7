"""RandomLTDState and rank_seed take seeds in [0, 2**63 - 1] only: larger ones used to alias smaller ones."""

from __future__ import annotations

import pytest

from random_ltd.layers import RandomLTDState
from random_ltd.layers.state import rank_seed
from random_ltd.ops import sample_sorted_indices

ALIASING = [2**63, 2**64, 2**64 + 1234]


@pytest.mark.parametrize("seed", [*ALIASING, -1], ids=str)
def test_state_refuses_seeds_outside_the_range(seed: int) -> None:
    with pytest.raises(ValueError, match=r"RandomLTDState\.seed must be in \[0, 2\*\*63 - 1\]"):
        RandomLTDState(seed=seed)


@pytest.mark.parametrize("seed", ALIASING, ids=str)
@pytest.mark.parametrize("rank", [0, 3])
def test_rank_seed_refuses_seeds_outside_the_range(seed: int, rank: int) -> None:
    with pytest.raises(ValueError, match=r"seed must be in \[0, 2\*\*63 - 1\]"):
        rank_seed(seed, rank)


def test_token_bypass_state_refuses_them_too() -> None:
    from random_ltd.layers.token_bypass import TokenBypassState

    with pytest.raises(ValueError, match="seed"):
        TokenBypassState(seed=2**64)


def test_state_refuses_non_int_seeds() -> None:
    with pytest.raises(TypeError, match="seed must be an int"):
        RandomLTDState(seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="seed must be an int"):
        RandomLTDState(seed=True)


def test_edges_of_the_range_draw_distinct_streams() -> None:
    """The largest seed is accepted and is not seed 0 (the aliasing this guards against)."""
    top = RandomLTDState(seed=2**63 - 1)
    zero = RandomLTDState(seed=0)
    assert top.effective_seed == 2**63 - 1
    a = top.indices(1, 4, 64, 8, "cpu")
    b = zero.indices(1, 4, 64, 8, "cpu")
    assert not (a == b).all()
    assert (a == sample_sorted_indices(1, 4, 64, 8, seed=2**63 - 1, layer_offset=1)[0]).all()


def test_negative_rank_is_refused() -> None:
    with pytest.raises(ValueError, match="data_parallel_rank"):
        rank_seed(5, -1)
