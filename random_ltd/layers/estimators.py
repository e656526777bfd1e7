"""Gradient estimators for discrete (here: binary keep/skip) gates: ReinMax, straight-through and Gumbel.

Every estimator takes logits ``[..., C]`` (a binary gate uses ``C = 2``: index 0 = skip, index 1 = keep) and returns
``(sample, probs)``: ``sample`` is an exact one-hot tensor in the forward pass (never ``1 - eps``), ``probs`` the
softmax the sample was drawn from. They differ only in the backward pass.

* ``reinmax`` (HadSkip appendix C, Liu et al. 2023): second-order (Heun) estimator. Forward: one-hot sample
  ``D ~ Categorical(softmax(logits))``. Backward, with ``pi0 = softmax(logits)``, ``pi1 = (softmax(logits/tau) + D)/2``
  and ``J(p) = diag(p) - p p^T``: ``grad = 2 J(pi1) g_D + J(pi0) (g_p - g_D / 2)``, centred over classes. Numerically
  the ``reinmax`` 0.1.0 package's estimator (tests compare both, sample for sample).
* ``straight_through`` (Bengio et al. 2013): same sample, backward ``J(pi0) g_D`` (first order).
* ``gumbel_straight_through``: hard one-hot of ``argmax(logits + Gumbel)``; backward through
  ``softmax((logits + Gumbel)/tau)``.

Inference rule (deterministic, :func:`binary_gate` with ``training=False``): keep the layer iff
``logits[..., 1] >= logits[..., 0]``, i.e. iff ``P(keep) >= 0.5`` (ties keep).
"""

from __future__ import annotations

from typing import Literal

import torch

__all__ = ["ESTIMATORS", "Estimator", "binary_gate", "gumbel_straight_through", "reinmax", "straight_through"]

Estimator = Literal["reinmax", "ste", "gumbel"]
ESTIMATORS: tuple[str, ...] = ("reinmax", "ste", "gumbel")


def _check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() < 1 or logits.shape[-1] < 2:
        got = list(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"logits must be a tensor [..., C] with C >= 2 classes, got {got}")
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")


def _check_tau(tau: float, low: float, name: str) -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not low <= tau < float("inf"):
        raise ValueError(f"tau must be a finite number >= {low} for {name}, got {tau!r}")
    return float(tau)


def _sample_one_hot(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One-hot sample of ``Categorical(probs)`` over the last dim with ``torch.multinomial`` (the package's draw)."""
    flat = probs.reshape(-1, probs.shape[-1])
    index = torch.multinomial(flat.float(), num_samples=1, replacement=True, generator=generator)
    return torch.zeros_like(flat).scatter_(-1, index, 1.0).view(probs.shape)


class _ReinMax(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits: torch.Tensor, tau: float, generator: torch.Generator | None):
        probs = logits.softmax(dim=-1)
        sample = _sample_one_hot(probs, generator)
        ctx.save_for_backward(logits, probs, sample)
        ctx.tau = tau
        return sample, probs

    @staticmethod
    def backward(ctx, grad_sample: torch.Tensor, grad_probs: torch.Tensor):
        logits, pi0, sample = ctx.saved_tensors
        pi1 = 0.5 * ((logits / ctx.tau).softmax(dim=-1) + sample)
        g1 = 2.0 * grad_sample * pi1
        g1 = g1 - pi1 * g1.sum(dim=-1, keepdim=True)  # 2 J(pi1) g_D
        g0 = (grad_probs - 0.5 * grad_sample) * pi0
        g0 = g0 - pi0 * g0.sum(dim=-1, keepdim=True)  # J(pi0) (g_p - g_D/2)
        grad = g0 + g1
        return grad - grad.mean(dim=-1, keepdim=True), None, None


class _StraightThrough(torch.autograd.Function):
    """Forward: ``hard`` exactly; backward: the incoming gradient goes to ``soft`` unchanged."""

    @staticmethod
    def forward(ctx, hard: torch.Tensor, soft: torch.Tensor):
        return hard.clone()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, grad


def reinmax(logits: torch.Tensor, tau: float = 1.0, *,
            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """ReinMax estimator: ``(one_hot_sample, softmax(logits))``, both shaped like ``logits`` ``[..., C]``.

    Args:
        logits: float ``[..., C]``, any device.
        tau: temperature of the Heun midpoint ``pi1``; ``>= 1`` as in the reference package.
        generator: RNG for the draw (default: the global one, as ``reinmax.reinmax``).

    Equivalent PyTorch code (forward)::

        probs = logits.softmax(-1)
        sample = one_hot(torch.multinomial(probs.view(-1, C), 1, replacement=True)).view_as(probs)

    Raises:
        ValueError / TypeError: logits not ``[..., C>=2]`` float, or ``tau < 1``.
    """
    _check_logits(logits)
    tau = _check_tau(tau, 1.0, "reinmax")
    return _ReinMax.apply(logits, tau, generator)


def straight_through(logits: torch.Tensor, *,
                     generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through estimator: one-hot sample of ``softmax(logits)``; gradient ``J(softmax) g``."""
    _check_logits(logits)
    probs = logits.softmax(dim=-1)
    sample = _sample_one_hot(probs.detach(), generator)
    return _StraightThrough.apply(sample, probs), probs


def gumbel_straight_through(logits: torch.Tensor, tau: float = 1.0, *,
                            generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Straight-through Gumbel-softmax: one-hot ``argmax(logits + G)``; gradient through ``softmax((logits+G)/tau)``.

    Returns ``(sample, softmax(logits))``; the sample has the distribution ``Categorical(softmax(logits))``.
    """
    _check_logits(logits)
    tau = _check_tau(tau, 1e-6, "gumbel")
    uniform = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=torch.float32)
    gumbel = -torch.log(-torch.log(uniform.clamp_min(torch.finfo(torch.float32).tiny))).to(logits.dtype)
    soft = ((logits + gumbel) / tau).softmax(dim=-1)
    hard = torch.zeros_like(soft).scatter_(-1, soft.detach().argmax(dim=-1, keepdim=True), 1.0)
    return _StraightThrough.apply(hard, soft), logits.softmax(dim=-1)


def binary_gate(logits: torch.Tensor, *, estimator: Estimator = "reinmax", tau: float = 1.0, training: bool = True,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """Binary keep gate ``g in {0, 1}`` of shape ``logits.shape[:-1]`` from two-class logits ``[..., 2]``.

    In training, ``g`` is the keep entry of the estimator's one-hot sample (exactly 0 or 1, differentiable through the
    estimator). Otherwise the deterministic rule ``g = 1 iff logits[..., 1] >= logits[..., 0]`` (no gradient).

    Raises:
        ValueError: logits not ``[..., 2]``, unknown estimator, bad tau.
    """
    _check_logits(logits)
    if logits.shape[-1] != 2:
        raise ValueError(f"binary_gate needs logits [..., 2] (skip, keep), got {list(logits.shape)}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if not training:
        return (logits[..., 1] >= logits[..., 0]).to(logits.dtype)
    if estimator == "reinmax":
        sample, _ = reinmax(logits, tau, generator=generator)
    elif estimator == "ste":
        sample, _ = straight_through(logits, generator=generator)
    else:
        sample, _ = gumbel_straight_through(logits, tau, generator=generator)
    return sample[..., 1]
