"""HadSkip gated layers: a learned per-sequence keep/skip gate in front of any batch-first transformer layer.

``h_i = f_i(h_{i-1}) * g_i + h_{i-1} * (1 - g_i)`` with ``g_i in {0, 1}`` per sequence, where ``g_i`` comes from a
one-hidden-layer FFN (:class:`GateFFN`) on the layer's input ``h_{i-1}``, pooled over the sequence by a masked mean
of the non-padding tokens (``pooling="mean"``, default) or by the first token (``pooling="first"``, [CLS]).

Modes of :class:`HadSkipLayer`:

* ``gating = False``: the wrapped layer alone (HadSkip stage 1 and the distillation teacher); bitwise the backbone.
* training: ``g`` from the estimator (ReinMax by default), exact 0/1 in forward, and the masked combination above
  (every sequence runs the layer, so gradients reach the gate through ``f(h) - h``).
* eval, ``real_skip = True`` (default): deterministic gates (keep iff ``P(keep) >= 0.5``) and real skipping: only the
  kept sequences are gathered (with ``random_ltd.ops.gather_tokens`` on the batch viewed as one row of ``b`` tokens
  of width ``s*h``), the layer runs on them alone, and ``scatter_tokens`` writes them back; the others pass through.
  A layer no sequence keeps is not called at all.
* eval, ``real_skip = False``: the same gates with the masked computation (reference for real skipping).

Framework-free: an adapter (e.g. ``random_ltd.integrations.transformers.hadskip``) wraps its layers and runs them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import nn

from random_ltd.layers.estimators import ESTIMATORS, Estimator, binary_gate
from random_ltd.ops import gather_tokens, scatter_tokens

__all__ = [
    "GateFFN",
    "HadSkipLayer",
    "HadSkipOutput",
    "Pooling",
    "budget_penalty",
    "collect_gates",
    "hadskip_layers",
    "set_gating",
    "set_real_skip",
]

Pooling = Literal["mean", "first"]


class GateFFN(nn.Module):
    """One-hidden-layer FFN ``Linear(h, d) -> GELU -> Linear(d, 2)`` on the pooled hidden state: (skip, keep) logits.

    ``init_keep_logit`` is the initial keep-minus-skip bias, so that a fresh gate keeps most layers
    (``sigmoid(2) = 0.88``) instead of dropping half of them at random before it has learned anything.
    """

    def __init__(self, hidden_size: int, gate_hidden: int | None = None, *, pooling: Pooling = "mean",
                 init_keep_logit: float = 2.0) -> None:
        super().__init__()
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive int, got {hidden_size!r}")
        gate_hidden = gate_hidden if gate_hidden is not None else max(1, hidden_size // 4)
        if not isinstance(gate_hidden, int) or gate_hidden < 1:
            raise ValueError(f"gate_hidden must be a positive int or None, got {gate_hidden!r}")
        if pooling not in ("mean", "first"):
            raise ValueError(f"pooling must be 'mean' (masked mean) or 'first' ([CLS]), got {pooling!r}")
        self.pooling = pooling
        self.fc1 = nn.Linear(hidden_size, gate_hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(gate_hidden, 2)
        with torch.no_grad():
            nn.init.normal_(self.fc2.weight, std=0.02)
            self.fc2.bias.copy_(torch.tensor([0.0, float(init_keep_logit)]))

    def pool(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``[b, s, h] -> [b, h]``: mean over tokens where ``mask`` ([b, s], nonzero = real token) is set, or [CLS]."""
        if self.pooling == "first":
            return hidden[:, 0]
        if mask is None:
            return hidden.mean(dim=1)
        weights = (mask != 0).to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gate logits ``[b, 2]`` (skip, keep) for hidden states ``[b, s, h]``."""
        return self.fc2(self.act(self.fc1(self.pool(hidden, mask))))


def _select_rows(t: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Rows ``rows`` ([1, k] int64) of ``t`` along dim 0, with the shared token gather on ``t`` viewed as [1, b, -1]."""
    b = t.shape[0]
    flat = t.reshape(1, b, -1)
    return gather_tokens(flat, rows, batch_first=True, check_indices=False).reshape(rows.shape[1], *t.shape[1:])


class HadSkipLayer(nn.Module):
    """A transformer layer ``f`` (batch-first ``[b, s, h] -> [b, s, h]``) behind a learned per-sequence gate.

    Call as the wrapped layer, plus an optional keyword ``gate_mask`` ([b, s], nonzero = real token) used only for
    pooling. In real-skip mode, every tensor argument whose first dimension equals the batch size ``b`` is
    row-selected with the kept sequences (attention masks ``[b, 1, 1, s]``, ``[b, 1, s, s]``, ``[b, s]``); tensors
    whose first dimension is 1 are broadcast and passed unchanged.

    After each forward, ``last_gate`` holds ``g`` ([b], differentiable in training) and ``last_calls`` the number
    of sequences the wrapped layer actually ran on.
    """

    def __init__(self, layer: nn.Module, hidden_size: int, *, layer_id: int = 0, estimator: Estimator = "reinmax",
                 tau: float = 1.0, gate_hidden: int | None = None, pooling: Pooling = "mean",
                 init_keep_logit: float = 2.0) -> None:
        super().__init__()
        if not isinstance(layer, nn.Module):
            raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
        if estimator not in ESTIMATORS:
            raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
        if estimator == "reinmax" and not tau >= 1.0:
            raise ValueError(f"tau must be >= 1 for reinmax, got {tau!r}")
        self.layer = layer
        self.gate = GateFFN(hidden_size, gate_hidden, pooling=pooling, init_keep_logit=init_keep_logit)
        self.layer_id = layer_id
        self.estimator = estimator
        self.tau = float(tau)
        self.gating = True
        self.real_skip = True
        self.force_gate: float | None = None
        self.last_gate: torch.Tensor | None = None
        self.last_calls: int = 0

    def extra_repr(self) -> str:
        return f"layer_id={self.layer_id}, estimator={self.estimator!r}, tau={self.tau}"

    def run_layer(self, hidden: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        """Call the wrapped layer on batch-first ``hidden`` (framework adapters override the calling convention)."""
        return self.layer(hidden, *args, **kwargs)

    def gates(self, hidden: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """Gate values ``[b]`` in {0, 1} for input ``hidden`` (estimator sample in training, rule in eval)."""
        if self.force_gate is not None:
            return hidden.new_full((hidden.shape[0],), float(self.force_gate))
        logits = self.gate(hidden, mask).float()
        return binary_gate(logits, estimator=self.estimator, tau=self.tau, training=self.training).to(hidden.dtype)

    def forward(self, hidden: torch.Tensor, *args: Any, gate_mask: torch.Tensor | None = None, **kwargs: Any):
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            got = list(hidden.shape) if isinstance(hidden, torch.Tensor) else type(hidden).__name__
            raise ValueError(f"HadSkip layer {self.layer_id}: hidden states must be [b, s, h], got {got}")
        b = hidden.shape[0]
        if not self.gating:
            self.last_gate, self.last_calls = None, b
            return self.run_layer(hidden, *args, **kwargs)
        g = self.gates(hidden, gate_mask)
        self.last_gate = g
        if self.training or not self.real_skip:
            self.last_calls = b
            out = self.run_layer(hidden, *args, **kwargs)
            first = out if isinstance(out, torch.Tensor) else out[0]
            gb = g.view(b, 1, 1).to(first.dtype)
            mixed = first * gb + hidden.to(first.dtype) * (1 - gb)
            if isinstance(out, torch.Tensor):
                return mixed
            return type(out)((mixed, *out[1:])) if isinstance(out, tuple) else [mixed, *out[1:]]
        return self._real_skip(hidden, g, args, kwargs)

    def _real_skip(self, hidden: torch.Tensor, g: torch.Tensor, args: tuple, kwargs: dict) -> torch.Tensor:
        b = hidden.shape[0]
        keep = torch.nonzero(g != 0).flatten()
        k = int(keep.numel())
        self.last_calls = k
        if k == 0:
            return hidden
        if k == b:
            out = self.run_layer(hidden, *args, **kwargs)
            if not isinstance(out, torch.Tensor):
                raise TypeError(f"HadSkip layer {self.layer_id}: real skipping needs a layer that returns a tensor, "
                                f"got {type(out).__name__}; set real_skip = False for this layer")
            return out
        rows = keep.view(1, k)

        def sub(value: Any) -> Any:
            if isinstance(value, torch.Tensor) and value.dim() >= 1 and value.shape[0] == b:
                return _select_rows(value, rows)
            return value

        out = self.run_layer(_select_rows(hidden, rows), *[sub(a) for a in args],
                             **{n: sub(v) for n, v in kwargs.items()})
        if not isinstance(out, torch.Tensor):
            raise TypeError(f"HadSkip layer {self.layer_id}: real skipping needs a layer that returns a tensor, got "
                            f"{type(out).__name__}; set real_skip = False for this layer")
        flat = hidden.to(out.dtype).reshape(1, b, -1)
        return scatter_tokens(flat, out.reshape(1, k, -1), rows, batch_first=True,
                              check_indices=False).view(hidden.shape)


def hadskip_layers(model: nn.Module) -> list[HadSkipLayer]:
    """Every :class:`HadSkipLayer` under ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, HadSkipLayer)]


def set_gating(model: nn.Module, enabled: bool) -> None:
    """Turn the gates of every HadSkip layer on (HadSkip) or off (plain backbone: stage 1, teacher)."""
    for m in hadskip_layers(model):
        m.gating = bool(enabled)


def set_real_skip(model: nn.Module, enabled: bool) -> None:
    """Eval-time execution: real skipping (True) or the masked computation (False)."""
    for m in hadskip_layers(model):
        m.real_skip = bool(enabled)


def collect_gates(layers: Iterable[HadSkipLayer]) -> torch.Tensor:
    """Gates of the last forward as ``[b, L]`` (differentiable in training). Raises if a layer has not gated."""
    gates = []
    for m in layers:
        if m.last_gate is None:
            raise RuntimeError(f"HadSkip layer {m.layer_id} has no gate from the last forward (gating off?)")
        gates.append(m.last_gate)
    if not gates:
        raise ValueError("no HadSkip layers given")
    return torch.stack(gates, dim=1)


def budget_penalty(gates: torch.Tensor, budget: float, beta: float = 1.0, unit: str = "layers") -> torch.Tensor:
    """The budget term for gates ``[b, L]``: zero when on average ``budget`` layers are used per sequence.

    ``unit="layers"`` (default): ``beta * (mean_b sum_i g_i - budget)^2``, the gap measured in layers, so one layer
    of overshoot costs ``beta`` and the paper's ``beta = 1`` holds the budget. ``unit="fraction"``:
    ``beta * (mean(gates) - budget / L)^2``, the same gap as a fraction of the layers, i.e. ``L^2`` times weaker (at
    L = 12 one layer of overshoot costs beta/144). The paper writes eq. (3) as ``(1/(nL) sum g - s)^2``, mixing the
    two units; ``budget`` is in layers (3, 6, 9 of 12) in both forms here.
    """
    if not isinstance(gates, torch.Tensor) or gates.dim() != 2:
        raise ValueError(f"gates must be a [b, L] tensor, got {getattr(gates, 'shape', type(gates).__name__)}")
    if unit not in ("layers", "fraction"):
        raise ValueError(f"unit must be 'layers' or 'fraction', got {unit!r}")
    num_layers = gates.shape[1]
    if not 0 <= budget <= num_layers:
        raise ValueError(f"budget must lie in [0, L={num_layers}] layers, got {budget!r}")
    if unit == "layers":
        return beta * (gates.float().sum(1).mean() - budget) ** 2
    return beta * (gates.float().mean() - budget / num_layers) ** 2


@dataclass
class HadSkipOutput:
    """What a HadSkip model returns for training and distillation.

    Attributes:
        logits: ``[b, classes]``.
        embeddings: embedding-layer output ``[b, s, h]`` (``L_emb``).
        hidden_states: output of each of the ``L`` layers, ``[b, s, h]`` each (``L_h``).
        attentions: head-averaged attention maps ``[b, s, s]`` per layer, or ``None`` where not recorded (``L_att``).
        gates: ``[b, L]`` gate values, or ``None`` with gating off.
        mask: ``[b, s]`` padding mask (nonzero = real token) or ``None``.
    """

    logits: torch.Tensor
    embeddings: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] = field(default_factory=list)
    attentions: list[torch.Tensor | None] = field(default_factory=list)
    gates: torch.Tensor | None = None
    mask: torch.Tensor | None = None
