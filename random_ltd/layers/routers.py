"""SkipLayer routers G(X | W_G), W_G in R^{d x 2}: one binary "run this layer?" decision per token.

Every router returns a :class:`RouterOutput` whose ``hard`` tensor holds exact 0.0/1.0 values in forward. Learned
routers give ``hard`` a straight-through gradient (forward: the hard value; backward: the gradient of the soft
probability of "run"), so the capacity ``r = hard.mean()`` and the auxiliary loss on it reach W_G. The gate values
multiplied into the layer's outputs are ``routed_scale`` (on the layer's residual branches of routed tokens) and
``skip_scale`` (on the pass-through of skipped tokens); ``None`` means "exactly 1, no gradient".

Kinds (paper section 2.1 and its baselines):

=========================  ===========================================================================================
``straight_through_gumbel``  default. Train: ``y = softmax((XW_G + noise * Gumbel) / temperature)``, hard = argmax y,
                             gradient through ``y[1]``. ``routed_scale = hard_st`` and ``skip_scale = 1 - hard_st``
                             (both exactly 1.0 in forward, Algorithm 1's ``M`` and ``1 - M``).
``sigmoid``                  ``p = sigmoid((z1 - z0) / temperature)`` (train: plus ``noise`` times logistic noise, the
                             binary form of Gumbel); hard = ``p > threshold``; straight-through gradient through p.
``top1_softmax``             ``g = softmax((XW_G + noise * Gumbel) / temperature)`` (noise in training only);
                             hard = argmax; Eq. 4: routed tokens' layer update
                             is multiplied by ``g[1]``, skipped tokens' pass-through by ``g[0]`` (so skipped outputs are
                             *not* equal to inputs). ``hard`` gets a straight-through gradient through ``g[1]`` so the
                             auxiliary loss is defined; the paper notes this form controls sparsity poorly.
``random``                   no parameters: hard ~ Bernoulli(capacity), in training and eval (the "Rand" baseline).
``highway``                  HighwayNet baseline: every token runs the layer, ``out = t * layer(x) + (1 - t) * x`` with
                             ``t = sigmoid(z1 - z0)``. Dense compute; no capacity control (``hard`` is all ones).
=========================  ===========================================================================================

In eval mode the learned routers are deterministic: no noise, ``hard = argmax`` (Algorithm 2), or ``p > threshold``
(``eval_noise > 0`` samples in eval too, to measure the model under its training-time routing).
Without autograd (``torch.no_grad``, decoding) the straight-through routers return ``routed_scale = skip_scale = None``
(their values would be exactly 1) to save the elementwise work.

Train/eval mismatch: training decides on ``argmax(XW_G + noise * Gumbel)``, eval on ``argmax(XW_G)``. With
``gumbel_noise = 1`` held constant and small logits, the two route different tokens (and a different fraction), so a
model trained well under sampling can be poor under argmax; evaluated with the same sampling it is fine. Annealing
the noise toward 0 (:func:`anneal_value`; the ``skip_layer`` block's ``anneal_steps``, ``gumbel_noise_final``,
``temperature_final``) ends training on the decisions eval uses. The temperature only shapes the straight-through
gradient (the decision is the argmax of the logits, whatever the temperature); annealing it toward 0 sharpens that
gradient toward the hard decision's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

__all__ = ["ANNEAL_SHAPES", "ROUTER_KINDS", "AnnealShape", "RouterKind", "RouterOutput", "SkipRouter", "anneal_value",
           "straight_through"]

RouterKind = Literal["straight_through_gumbel", "sigmoid", "top1_softmax", "random", "highway"]
ROUTER_KINDS: tuple[str, ...] = ("straight_through_gumbel", "sigmoid", "top1_softmax", "random", "highway")
AnnealShape = Literal["linear", "cosine"]
ANNEAL_SHAPES: tuple[str, ...] = ("linear", "cosine")


def anneal_value(step: int, steps: int, start: float, final: float, shape: AnnealShape = "linear") -> float:
    """``start`` at step 0, ``final`` from ``steps`` on, ``linear`` or ``cosine`` (half-period) in between.

    Drives the router's Gumbel noise scale and temperature over training (see the module docstring).

    Raises:
        ValueError: ``step < 0``, ``steps < 1`` or an unknown ``shape``.
    """
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise ValueError(f"step must be an int >= 0, got {step!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if shape not in ANNEAL_SHAPES:
        raise ValueError(f"shape must be one of {ANNEAL_SHAPES}, got {shape!r}")
    if step >= steps:
        return float(final)
    frac = step / steps
    if shape == "cosine":
        frac = 0.5 * (1.0 - math.cos(math.pi * frac))
    return float(start + (final - start) * frac)


class _StraightThrough(torch.autograd.Function):
    """Forward returns ``hard`` bit for bit; backward sends the whole gradient to ``soft``.

    ``hard - soft.detach() + soft`` is the usual trick, but it is not exactly 0/1 in floating point.
    """

    @staticmethod
    def forward(ctx, hard, soft):
        return hard.clone()

    @staticmethod
    def backward(ctx, grad):
        return None, grad


def straight_through(hard: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """``hard`` in forward (exactly), the gradient of ``soft`` in backward. Shapes must match."""
    if hard.shape != soft.shape:
        raise ValueError(f"hard {list(hard.shape)} and soft {list(soft.shape)} must have the same shape")
    return _StraightThrough.apply(hard, soft)


@dataclass
class RouterOutput:
    """Per-token routing of one SkipLayer call; every tensor is ``[b, t]``.

    Attributes:
        hard: exact 0.0/1.0 decisions (1 = run the layer), straight-through gradient for learned routers.
        routed_scale: multiplies the residual branches of routed tokens, or None (exactly 1).
        skip_scale: multiplies the pass-through of skipped tokens, or None (exactly 1: output == input bitwise).
        prob: the router's soft probability of "run" (for logging), or None for ``random``.
        dense_gate: highway only: ``t`` in ``t * layer(x) + (1 - t) * x``; every token runs the layer.
    """

    hard: torch.Tensor
    routed_scale: torch.Tensor | None = None
    skip_scale: torch.Tensor | None = None
    prob: torch.Tensor | None = None
    dense_gate: torch.Tensor | None = None

    @property
    def routed(self) -> torch.Tensor:
        """Bool ``[b, t]``: which tokens run the layer."""
        return self.hard.detach() > 0.5


class SkipRouter(nn.Module):
    """G(X | W_G): a bias-free ``Linear(d, 2)`` (``weight`` is W_G^T) and the decision rule of ``kind``.

    Args:
        hidden_size: d.
        kind: one of ``ROUTER_KINDS`` (see the module docstring).
        capacity: target fraction P in (0, 1]; used by ``random`` as its Bernoulli probability.
        temperature: softmax / sigmoid temperature (> 0).
        gumbel_noise: scale of the Gumbel (logistic for ``sigmoid``) noise in training (>= 0; 0 = no noise).
        threshold: ``sigmoid`` decision threshold in (0, 1).
        init_std: std of the normal initialisation of W_G.
    """

    def __init__(self, hidden_size: int, kind: RouterKind = "straight_through_gumbel", *, capacity: float = 0.5,
                 temperature: float = 1.0, gumbel_noise: float = 1.0, threshold: float = 0.5,
                 init_std: float = 0.02) -> None:
        super().__init__()
        if kind not in ROUTER_KINDS:
            raise ValueError(f"kind must be one of {ROUTER_KINDS}, got {kind!r}")
        if not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be an int >= 1, got {hidden_size!r}")
        if not 0.0 < capacity <= 1.0:
            raise ValueError(f"capacity must be in (0, 1], got {capacity!r}")
        if not temperature > 0.0:
            raise ValueError(f"temperature must be > 0, got {temperature!r}")
        if not gumbel_noise >= 0.0:
            raise ValueError(f"gumbel_noise must be >= 0, got {gumbel_noise!r}")
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {threshold!r}")
        self.kind = kind
        self.capacity = float(capacity)
        self.temperature = float(temperature)
        self.gumbel_noise = float(gumbel_noise)
        self.threshold = float(threshold)
        self.eval_noise = 0.0  # > 0: sample in eval mode too (sampled evaluation); 0: argmax, Algorithm 2
        self.proj = None if kind == "random" else nn.Linear(hidden_size, 2, bias=False)
        if self.proj is not None:
            nn.init.normal_(self.proj.weight, std=init_std)

    @property
    def learned(self) -> bool:
        """True when the router has parameters and a capacity to control (not ``random``, not ``highway``)."""
        return self.kind not in ("random", "highway")

    def extra_repr(self) -> str:
        return (f"kind={self.kind}, capacity={self.capacity}, temperature={self.temperature}, "
                f"gumbel_noise={self.gumbel_noise}, threshold={self.threshold}")

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``X W_G``: ``[..., d] -> [..., 2]`` in fp32 (index 1 = run the layer)."""
        if self.proj is None:
            raise RuntimeError("the random router has no logits")
        return nn.functional.linear(x.float(), self.proj.weight.float())

    def forward(self, x: torch.Tensor, generator: torch.Generator | None = None) -> RouterOutput:
        """Route ``x`` ``[b, t, d]``; ``generator`` drives the training noise and the random router."""
        if x.dim() != 3:
            raise ValueError(f"x must be [b, t, d], got {list(x.shape)}")
        noise = self.gumbel_noise if self.training else self.eval_noise
        noisy = noise > 0.0
        # without a gradient the straight-through scales are exactly hard / 1 - hard: skip building them (decoding)
        grad = torch.is_grad_enabled()
        if self.kind == "random":
            u = torch.rand(x.shape[:2], generator=generator, device=x.device)
            return RouterOutput(hard=(u < self.capacity).float())
        z = self.logits(x)
        if self.kind == "highway":
            t = torch.sigmoid((z[..., 1] - z[..., 0]) / self.temperature)
            return RouterOutput(hard=torch.ones_like(t), prob=t, dense_gate=t)
        if self.kind == "sigmoid":
            logit = z[..., 1] - z[..., 0]
            if noisy:
                u = torch.rand(logit.shape, generator=generator, device=x.device).clamp_(1e-6, 1 - 1e-6)
                logit = logit + noise * (u.log() - (-u).log1p())  # logistic = Gumbel - Gumbel
            p = torch.sigmoid(logit / self.temperature)
            if not grad:
                return RouterOutput(hard=(p > self.threshold).float(), prob=p)
            hard = straight_through((p > self.threshold).float(), p)
            return RouterOutput(hard=hard, routed_scale=hard, skip_scale=1.0 - hard, prob=p)
        if noisy:  # Gumbel noise for straight_through_gumbel and top1_softmax
            u = torch.rand(z.shape, generator=generator, device=x.device).clamp_(1e-10, 1.0)
            z = z - noise * torch.log(-torch.log(u))
        y = torch.softmax(z / self.temperature, dim=-1)
        # argmax with ties going to "skip", identical in training and in eval (decoding, Algorithm 2)
        decision = (z[..., 1] > z[..., 0]).float()
        if self.kind == "top1_softmax":
            hard = straight_through(decision, y[..., 1]) if grad else decision
            return RouterOutput(hard=hard, routed_scale=y[..., 1], skip_scale=y[..., 0], prob=y[..., 1])
        if not grad:
            return RouterOutput(hard=decision, prob=y[..., 1])
        hard = straight_through(decision, y[..., 1])
        return RouterOutput(hard=hard, routed_scale=hard, skip_scale=1.0 - hard, prob=y[..., 1])
