"""Per-model random-LTD state: the sampling key, the kept lengths of this step, and exact layer-token counts.

One ``RandomLTDState`` is shared by the wrapped layers of one model (there is no process-global state). Indices are
never stored: each wrapped layer redraws them from the counter key ``(seed, step, micro_batch, layer)``, so activation
recompute and every tensor-parallel rank get the same indices, and data-parallel ranks (which fold their rank into the
seed) get different ones.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from random_ltd.ops import sample_sorted_indices
from random_ltd.ops.reference import philox4x32
from random_ltd.seeds import SEED_MAX, check_seed

__all__ = ["RandomLTDState", "LayerTokenCount", "rank_seed"]

_SEED_MASK = SEED_MAX


def rank_seed(seed: int, data_parallel_rank: int) -> int:
    """A 63-bit seed for one data-parallel rank, derived from the base seed (distinct streams per rank).

    Raises:
        TypeError / ValueError: ``seed`` outside ``[0, 2**63 - 1]`` (``random_ltd.seeds``), or a negative rank.
    """
    check_seed(seed)
    if isinstance(data_parallel_rank, bool) or not isinstance(data_parallel_rank, int) or data_parallel_rank < 0:
        raise ValueError(f"data_parallel_rank must be an int >= 0, got {data_parallel_rank!r}")
    if data_parallel_rank == 0:
        return seed & _SEED_MASK
    a, b, _, _ = philox4x32((data_parallel_rank & 0xFFFFFFFF, data_parallel_rank >> 32, 0x5EED, 0),
                            (seed & 0xFFFFFFFF, (seed >> 32) & 0xFFFFFFFF))
    return ((b << 32) | a) & _SEED_MASK


@dataclass
class LayerTokenCount:
    """Layer-tokens of one micro-batch or step: what ran, and what the full-length baseline would have run."""

    consumed: int = 0
    baseline: int = 0
    samples: int = 0
    tokens: int = 0

    def __iadd__(self, other: LayerTokenCount) -> LayerTokenCount:
        self.consumed += other.consumed
        self.baseline += other.baseline
        self.samples += other.samples
        self.tokens += other.tokens
        return self


@dataclass
class RandomLTDState:
    """What the wrapped layers of one model share.

    Attributes:
        seed: base seed from the config, in ``[0, 2**63 - 1]``; ``data_parallel_rank`` is folded in by
            ``rank_seed``.
        total_layers: L, to count the layer-tokens of the layers that are not wrapped (always full length).
        kept_lengths: kept length of each wrapped layer (by layer id) for the current step; missing -> full.
        step: optimizer step; micro_batch: index of the current micro-batch within the step.
    """

    seed: int = 1234
    data_parallel_rank: int = 0
    total_layers: int = 0
    kept_lengths: dict[int, int] = field(default_factory=dict)
    step: int = 0
    micro_batch: int = -1
    enabled: bool = True
    _pending: dict[int, tuple[int, int, int]] = field(default_factory=dict, repr=False)
    _shape: tuple[int, int] | None = field(default=None, repr=False)
    _step_count: LayerTokenCount = field(default_factory=LayerTokenCount, repr=False)

    @property
    def effective_seed(self) -> int:
        return rank_seed(self.seed, self.data_parallel_rank)

    def __post_init__(self) -> None:
        check_seed(self.seed, "RandomLTDState.seed")

    # -- called by the wrapped layers -------------------------------------------------------------------------
    def kept_length(self, layer_id: int, seq_len: int) -> int:
        """Tokens layer ``layer_id`` keeps out of ``seq_len`` this step (``seq_len`` means no dropping)."""
        if not self.enabled:
            return seq_len
        return min(seq_len, self.kept_lengths.get(layer_id, seq_len))

    def indices(self, layer_id: int, batch: int, seq_len: int, keep: int, device: torch.device) -> torch.Tensor:
        """Sorted kept indices ``[batch, keep]`` for this layer and micro-batch (a pure function of the key)."""
        return sample_sorted_indices(1, batch, seq_len, keep, seed=self.effective_seed, step=self.step,
                                     micro_batch=max(self.micro_batch, 0), layer_offset=layer_id, device=device)[0]

    def sharded_indices(self, layer_id: int, batch: int, shard_len: int, keep_per_shard: int, shards: int,
                        device: torch.device) -> torch.Tensor:
        """Stratified indices ``[shards, batch, keep_per_shard]``: a sequence split into ``shards`` contiguous shards.

        Sequence parallelism: each tensor-parallel rank keeps ``keep_per_shard`` sorted positions of its own shard.
        Every rank computes the picks of all shards from the same counter key, so the global kept positions
        (``picks + shard * shard_len``, sorted by construction) are known everywhere without communication.
        """
        return sample_sorted_indices(shards, batch, shard_len, keep_per_shard, seed=self.effective_seed,
                                     step=self.step, micro_batch=max(self.micro_batch, 0),
                                     layer_offset=layer_id * shards, device=device)

    def record(self, layer_id: int, batch: int, seq_len: int, kept: int) -> None:
        """Note what a wrapped layer ran. Recompute overwrites the same entry, so nothing is counted twice."""
        self._pending[layer_id] = (batch, seq_len, kept)
        self._shape = (batch, seq_len)

    # -- called by the model's forward pre-hook and by the engine ---------------------------------------------
    def begin_micro_batch(self) -> None:
        self._flush()
        self.micro_batch += 1

    def _flush(self) -> None:
        if self._shape is None:
            return
        batch, seq_len = self._shape
        full_layers = max(self.total_layers - len(self._pending), 0)
        wrapped = sum(b * k for b, _, k in self._pending.values())
        wrapped_baseline = sum(b * s for b, s, _ in self._pending.values())
        self._step_count += LayerTokenCount(consumed=wrapped + full_layers * batch * seq_len,
                                            baseline=wrapped_baseline + full_layers * batch * seq_len,
                                            samples=batch, tokens=batch * seq_len)
        self._pending.clear()
        self._shape = None

    def finish_step(self) -> LayerTokenCount:
        """Close the optimizer step: return its layer-token count and reset the micro-batch counter."""
        self._flush()
        count, self._step_count = self._step_count, LayerTokenCount()
        self.micro_batch = -1
        return count

    def advance(self, step: int, kept_lengths: dict[int, int]) -> None:
        """Move to optimizer step ``step`` with the scheduled kept lengths."""
        self.step = step
        self.kept_lengths = dict(kept_lengths)

    def state_dict(self) -> dict:
        return {"seed": self.seed, "step": self.step, "kept_lengths": dict(self.kept_lengths)}

    def load_state_dict(self, sd: dict) -> None:
        self.step = int(sd["step"])
        self.kept_lengths = {int(k): int(v) for k, v in sd["kept_lengths"].items()}
