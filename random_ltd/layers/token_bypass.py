"""TokenBypass (Hou et al. 2022), the baseline of the paper's section 5.1, as a state of the random-LTD wrapper.

What differs from random-LTD is only *which* tokens a wrapped layer keeps, so TokenBypass is a ``RandomLTDState``
whose ``indices`` are not random: the wrapped layers, gathers, scatters, mask slicing, position gathering and
layer-token accounting are those of ``RandomLTDLayer``.

Selection (per micro-batch, the same for every wrapped layer, so the dropped group bypasses the whole block):

* every vocabulary id ``v`` has a score, the moving average of the per-token loss at positions holding ``v``
  (``score[v] = beta * score[v] + (1 - beta) * mean loss of v in the micro-batch``; the first observation sets it;
  ids never seen rank above every seen id, i.e. are kept first);
* the loss at position ``t`` is credited to ``input_ids[b, t]``; for a causal LM this is the loss of predicting the
  token after it, which is exactly the prediction a bypassed position would make with less compute; for a masked LM,
  the loss of the masked token itself;
* a row keeps its special tokens, then the positions with the highest scores (ties: earlier position first), sorted.

The training loop feeds the loss after each forward: ``state.update(input_ids, per_token_loss)``. The model's token
ids reach the state through a forward pre-hook (``input_ids_hook``) installed by ``convert_to_random_ltd``. Scores
are per process (not all-reduced): data-parallel ranks may rank ids differently.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from random_ltd.layers.state import RandomLTDState

__all__ = ["TokenBypassState", "select_bypass_indices"]

#: score of ids never observed: above every real loss, below special tokens (which get +inf)
_UNSEEN = 1e30


def select_bypass_indices(input_ids: torch.Tensor, scores: torch.Tensor, keep: int,
                          special_token_ids: Sequence[int] = ()) -> torch.Tensor:
    """Sorted positions ``[b, keep]`` of each row's special tokens and highest-scoring ids.

    Args:
        input_ids: int ``[b, s]`` token ids.
        scores: float ``[V]`` score per vocabulary id (ids >= V count as unseen).
        keep: tokens kept per row, ``1 <= keep <= s``.
        special_token_ids: ids always kept.

    Equivalent PyTorch code::

        key = scores[input_ids]; key[isin(input_ids, special)] = inf
        idx = key.sort(dim=1, descending=True, stable=True).indices[:, :keep].sort(dim=1).values

    Raises:
        ValueError: bad shapes or ``keep``, or a row with more special tokens than ``keep``.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
        raise ValueError(f"input_ids must be an integer tensor [b, s], got "
                         f"{getattr(input_ids, 'dtype', type(input_ids).__name__)} "
                         f"{list(getattr(input_ids, 'shape', []))}")
    seq_len = input_ids.shape[1]
    if not 1 <= keep <= seq_len:
        raise ValueError(f"keep must be in [1, {seq_len}] (the sequence length), got {keep}")
    ids = input_ids.long()
    table = torch.full((max(int(ids.max()) + 1, scores.numel()),), _UNSEEN, dtype=torch.float32, device=ids.device)
    table[:scores.numel()] = scores.to(device=ids.device, dtype=torch.float32)
    key = table[ids]
    if len(special_token_ids):
        special = torch.isin(ids, torch.tensor(list(special_token_ids), device=ids.device))
        too_many = special.sum(dim=1) > keep
        if bool(too_many.any()):
            row = int(too_many.nonzero()[0, 0])
            raise ValueError(f"row {row} holds {int(special[row].sum())} special tokens but only {keep} tokens are "
                             f"kept: special tokens are never dropped, so keep must be >= their count")
        key = key.masked_fill(special, float("inf"))
    order = torch.sort(key, dim=1, descending=True, stable=True).indices[:, :keep]
    return torch.sort(order, dim=1).values


@dataclass
class TokenBypassState(RandomLTDState):
    """``RandomLTDState`` whose kept tokens are chosen by loss (TokenBypass) instead of at random.

    Attributes (besides ``RandomLTDState``'s):
        moving_average: beta of the per-id score.
        special_token_ids: ids never dropped.
        input_ids_name: keyword of the token ids in the model's forward (else its first positional argument).
        scores: float ``[V]`` per-id scores (grown as new ids appear); ``seen``: bool ``[V]``.
    """

    moving_average: float = 0.9
    special_token_ids: tuple[int, ...] = ()
    input_ids_name: str = "input_ids"
    scores: torch.Tensor = field(default_factory=lambda: torch.zeros(0))
    seen: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.bool))
    _input_ids: torch.Tensor | None = field(default=None, repr=False)
    _cache: tuple[Any, torch.Tensor] | None = field(default=None, repr=False)

    # -- fed by the model's pre-hook and by the training loop -------------------------------------------------
    def set_input_ids(self, input_ids: torch.Tensor) -> None:
        """Token ids ``[b, s]`` of the micro-batch about to run (drops the cached selection)."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"TokenBypass: the model's token ids must be an integer tensor [b, s], got "
                             f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}"
                             f"{list(getattr(input_ids, 'shape', []))}")
        self._input_ids = input_ids.detach()
        self._cache = None

    def input_ids_hook(self) -> Callable[[nn.Module, tuple, dict], None]:
        """Forward pre-hook (``register_forward_pre_hook(hook, with_kwargs=True)``) that reads the token ids."""

        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if not module.training:
                return
            ids = kwargs.get(self.input_ids_name, args[0] if args else None)
            self.set_input_ids(ids)

        return hook

    @torch.no_grad()
    def update(self, input_ids: torch.Tensor, per_token_loss: torch.Tensor) -> None:
        """Fold one micro-batch's per-token loss into the per-id moving average.

        Args:
            input_ids: int ``[b, s]``; the loss at ``[b, t]`` is credited to ``input_ids[b, t]``.
            per_token_loss: float ``[b, s]`` (unreduced loss, e.g. ``cross_entropy(..., reduction="none")``); NaN
                entries (positions without a loss, e.g. unmasked tokens of a masked LM) are ignored.
        """
        if not isinstance(input_ids, torch.Tensor) or not isinstance(per_token_loss, torch.Tensor) \
                or input_ids.shape != per_token_loss.shape or input_ids.dim() != 2:
            raise ValueError(f"update: input_ids and per_token_loss must both be [b, s] tensors, got "
                             f"{list(getattr(input_ids, 'shape', []))} and "
                             f"{list(getattr(per_token_loss, 'shape', []))}")
        ids = input_ids.reshape(-1).long().cpu()
        loss = per_token_loss.detach().reshape(-1).float().cpu()
        valid = ~torch.isnan(loss)
        ids, loss = ids[valid], loss[valid]
        if ids.numel() == 0:
            return
        if int(ids.min()) < 0:
            raise ValueError(f"update: input_ids must be >= 0, got {int(ids.min())}")
        size = max(int(ids.max()) + 1, self.scores.numel())
        if size > self.scores.numel():
            grow = size - self.scores.numel()
            self.scores = torch.cat([self.scores, torch.zeros(grow)])
            self.seen = torch.cat([self.seen, torch.zeros(grow, dtype=torch.bool)])
        total = torch.zeros(size).index_add_(0, ids, loss)
        count = torch.zeros(size).index_add_(0, ids, torch.ones_like(loss))
        present = count > 0
        mean = total[present] / count[present]
        beta = self.moving_average
        old = self.scores[present]
        self.scores[present] = torch.where(self.seen[present], beta * old + (1 - beta) * mean, mean)
        self.seen |= present
        # the cached selection stays: a recompute in this micro-batch's backward must see the same tokens; the new
        # scores apply from the next micro-batch (set_input_ids drops the cache)

    def ranking_scores(self) -> torch.Tensor:
        """Scores used for selection: the moving averages, unseen ids at +1e30."""
        return self.scores.masked_fill(~self.seen, _UNSEEN)

    # -- called by the wrapped layers -------------------------------------------------------------------------
    def indices(self, layer_id: int, batch: int, seq_len: int, keep: int, device: torch.device) -> torch.Tensor:
        """The micro-batch's kept positions ``[batch, keep]``: identical for every wrapped layer (and recompute)."""
        ids = self._input_ids
        if ids is None or tuple(ids.shape) != (batch, seq_len):
            raise RuntimeError(f"TokenBypass layer {layer_id}: no token ids of shape [{batch}, {seq_len}] for this "
                               f"micro-batch (got {None if ids is None else list(ids.shape)}); the model's forward "
                               f"must receive them as '{self.input_ids_name}' or as its first argument")
        key = (keep, str(device))
        if self._cache is None or self._cache[0] != key:
            idx = select_bypass_indices(ids, self.ranking_scores(), keep, self.special_token_ids)
            self._cache = (key, idx.to(device))
        return self._cache[1]

    def sharded_indices(self, layer_id: int, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Sequence-parallel (stratified per shard) picks cannot be a global top-k: unsupported, never silent."""
        raise NotImplementedError(f"TokenBypass layer {layer_id}: sequence parallelism is not supported (the kept "
                                  "set is a global top-k by loss, not a per-shard draw); turn sequence_parallel off")

    def state_dict(self) -> dict:
        return {**super().state_dict(), "token_bypass_scores": self.scores.clone(),
                "token_bypass_seen": self.seen.clone()}

    def load_state_dict(self, sd: dict) -> None:
        super().load_state_dict(sd)
        if "token_bypass_scores" in sd:
            self.scores = sd["token_bypass_scores"].clone().float()
            self.seen = sd["token_bypass_seen"].clone().bool()
        self._cache = None
