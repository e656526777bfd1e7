"""SkipLayer ("Learning to Skip for Language Modeling"): a learned router lets each token skip a transformer layer.

A :class:`SkipLayer` wraps one transformer layer that is exposed through :class:`SkipLayerParts`, its decomposition
into (attention norm; key/value projection; query projection; attention + output projection; FFN branch). Per token
the router (``random_ltd.layers.routers``) decides whether the layer runs (Figure 3, Algorithm 1):

* every token's key and value are computed (and written to the KV cache when one is given), so routed tokens attend
  over the full causal context;
* only routed tokens get a query, an attention output and the FFN: ``x' = x + s * attn(q, K, V)``,
  ``out = x' + s * ffn(x')`` with ``s`` the router's ``routed_scale`` (exactly 1.0 for the straight-through routers);
* skipped tokens leave unchanged (``out = x``, bitwise, for the straight-through routers).

Two implementations give the same outputs and gradients for the same decisions:

``efficient`` (default, section 2.2): per sequence the routed tokens, padded to the longest row with skipped
    positions (always possible: a row never has more than ``t`` tokens), are gathered with
    :func:`random_ltd.ops.gather_tokens`; queries, attention and output projection run on ``[b, k_max]``; then the
    routed tokens of the whole batch, flattened into one row, are processed by the FFN in groups of ``group_size``
    (``Gsize``; the token count is padded up to a multiple of it so the FFN sees few distinct shapes), and scattered
    back with :func:`random_ltd.ops.scatter_tokens`. Default ``Gsize = ceil(P * b * t)`` (the paper's ``∝ P·B·T``).
``dense``: every token runs the whole layer and the result is selected with the mask (the reference).

The auxiliary capacity loss ``λ · Σ_i (r_i − P)²`` is collected from a model's SkipLayers with
:func:`skip_layer_aux_loss`; each layer keeps only its last routing (no global state). Decoding (Algorithm 2) uses
the same code with a KV cache object that has ``update(k, v, layer_idx) -> (K, V)`` (:class:`SkipKVCache`, or a
Hugging Face ``Cache``).

Train/eval routing: training samples decisions with Gumbel noise, eval takes the argmax (Algorithm 2). Call
:func:`anneal_skip_layers` once per optimizer step to anneal the noise (and optionally the temperature) toward the
options' final values, so that training ends on the decisions eval uses; :func:`sampled_routing` evaluates a model
with training-style sampling to measure the gap.

This module knows nothing about DeepSpeed, megatron or transformers: adapters implement :class:`SkipLayerParts`.
"""

from __future__ import annotations

import dataclasses
import math
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import nn

from random_ltd.layers.routers import (
    ANNEAL_SHAPES,
    ROUTER_KINDS,
    AnnealShape,
    RouterKind,
    RouterOutput,
    SkipRouter,
    anneal_value,
)
from random_ltd.ops import gather_tokens, scatter_tokens

__all__ = [
    "SkipLayer",
    "SkipLayerOptions",
    "SkipRouting",
    "SkipLayerParts",
    "SkipKVCache",
    "TinyDecoder",
    "TinyDecoderLayer",
    "anneal_skip_layers",
    "find_skip_layers",
    "sampled_routing",
    "sdpa_attend",
    "skip_layer_aux_loss",
    "skip_layer_capacities",
    "skip_layer_metrics",
]

Implementation = Literal["efficient", "dense"]


@dataclass(frozen=True)
class SkipLayerOptions:
    """Settings of one SkipLayer (the ``skip_layer`` DeepSpeed block builds these; see ``SkipLayerConfig``).

    Attributes:
        capacity: target probability P in (0, 1] that a token runs the layer.
        aux_loss_weight: λ >= 0 of the auxiliary capacity loss (paper: 0.1).
        router: one of ``ROUTER_KINDS``.
        temperature: router softmax/sigmoid temperature (> 0) at the start of training.
        gumbel_noise: training noise scale (>= 0) at the start of training.
        anneal_steps: optimizer steps over which :func:`anneal_skip_layers` moves the noise to
            ``gumbel_noise_final`` and the temperature to ``temperature_final``; None = constant (no annealing).
        gumbel_noise_final: noise scale from ``anneal_steps`` on (>= 0; 0 = train on the argmax decisions).
        temperature_final: temperature from ``anneal_steps`` on (> 0), or None to keep ``temperature``.
        anneal_shape: ``"linear"`` or ``"cosine"``.
        threshold: ``sigmoid`` router threshold in (0, 1).
        group_size: Gsize >= 1, or None for ``ceil(P * b * t)``.
        implementation: ``"efficient"`` (gather/scatter) or ``"dense"`` (masked reference).
        layer_id: index of the wrapped layer in its model (metrics names, KV-cache slot).
    """

    capacity: float = 0.5
    aux_loss_weight: float = 0.1
    router: RouterKind = "straight_through_gumbel"
    temperature: float = 1.0
    gumbel_noise: float = 1.0
    threshold: float = 0.5
    group_size: int | None = None
    implementation: Implementation = "efficient"
    layer_id: int = 0
    anneal_steps: int | None = None
    gumbel_noise_final: float = 0.0
    temperature_final: float | None = None
    anneal_shape: AnnealShape = "linear"

    def __post_init__(self) -> None:
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, (int, float)) \
                or not 0.0 < self.capacity <= 1.0:
            raise ValueError(f"capacity must be a number in (0, 1], got {self.capacity!r}")
        if isinstance(self.aux_loss_weight, bool) or not isinstance(self.aux_loss_weight, (int, float)) \
                or not self.aux_loss_weight >= 0.0:
            raise ValueError(f"aux_loss_weight must be a number >= 0, got {self.aux_loss_weight!r}")
        if self.router not in ROUTER_KINDS:
            raise ValueError(f"router must be one of {ROUTER_KINDS}, got {self.router!r}")
        if self.group_size is not None and (isinstance(self.group_size, bool) or not isinstance(self.group_size, int)
                                            or self.group_size < 1):
            raise ValueError(f"group_size must be an int >= 1 or None, got {self.group_size!r}")
        if self.implementation not in ("efficient", "dense"):
            raise ValueError(f"implementation must be 'efficient' or 'dense', got {self.implementation!r}")
        if isinstance(self.layer_id, bool) or not isinstance(self.layer_id, int) or self.layer_id < 0:
            raise ValueError(f"layer_id must be an int >= 0, got {self.layer_id!r}")
        if self.anneal_steps is not None and (isinstance(self.anneal_steps, bool)
                                              or not isinstance(self.anneal_steps, int) or self.anneal_steps < 1):
            raise ValueError(f"anneal_steps must be an int >= 1 or None, got {self.anneal_steps!r}")
        if isinstance(self.gumbel_noise_final, bool) or not isinstance(self.gumbel_noise_final, (int, float)) \
                or not self.gumbel_noise_final >= 0.0:
            raise ValueError(f"gumbel_noise_final must be a number >= 0, got {self.gumbel_noise_final!r}")
        if self.temperature_final is not None and (isinstance(self.temperature_final, bool)
                                                   or not isinstance(self.temperature_final, (int, float))
                                                   or not self.temperature_final > 0.0):
            raise ValueError(f"temperature_final must be a number > 0 or None, got {self.temperature_final!r}")
        if self.anneal_shape not in ANNEAL_SHAPES:
            raise ValueError(f"anneal_shape must be one of {ANNEAL_SHAPES}, got {self.anneal_shape!r}")

    def noise_at(self, step: int) -> float:
        """Gumbel noise scale for optimizer step ``step`` (0-based) under this layer's annealing."""
        if self.anneal_steps is None:
            return float(self.gumbel_noise)
        return anneal_value(step, self.anneal_steps, self.gumbel_noise, self.gumbel_noise_final, self.anneal_shape)

    def temperature_at(self, step: int) -> float:
        """Router temperature for optimizer step ``step`` (0-based) under this layer's annealing."""
        if self.anneal_steps is None or self.temperature_final is None:
            return float(self.temperature)
        return anneal_value(step, self.anneal_steps, self.temperature, self.temperature_final, self.anneal_shape)


class SkipLayerParts(ABC):
    """A transformer layer decomposed as Figure 3 needs it (pre-LN form ``x' = x + attn(LN(x))``,
    ``out = x' + ffn(x')``). Adapters implement it for a framework's layer; :class:`TinyDecoderLayer` is one.

    Shapes: ``x``/``h`` ``[b, t, d]``; q/k/v ``[b, heads, n, head_dim]``; ``index`` int64 ``[b, k]``, positions of
    the selected tokens inside the current chunk of ``t`` tokens; ``ctx`` is whatever the caller passed along
    (e.g. rotary ``(cos, sin)`` for the chunk), given unchanged to every method.
    """

    @abstractmethod
    def attn_norm(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Normalisation in front of attention, for every token: ``[b, t, d] -> [b, t, d]``."""

    @abstractmethod
    def key_value(self, h: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of every token of the chunk (positions encoded): ``[b, kv_heads, t, head_dim]`` each."""

    @abstractmethod
    def query(self, h: torch.Tensor, index: torch.Tensor, ctx: Any) -> torch.Tensor:
        """Queries of the selected tokens ``h`` ``[b, k, d]`` at chunk positions ``index`` -> ``[b, heads, k, hd]``."""

    @abstractmethod
    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor,
               ctx: Any) -> torch.Tensor:
        """Attention of ``q`` over all keys with ``mask`` (bool ``[b|1, 1, k, T]``, True = may attend, or additive
        float), then the output projection: ``-> [b, k, d]`` (the residual branch, without the residual)."""

    @abstractmethod
    def ffn(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        """The FFN branch including its norm, pointwise over tokens: ``[..., d] -> [..., d]`` (no residual)."""


def sdpa_attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, *,
                scale: float | None = None, dropout: float = 0.0) -> torch.Tensor:
    """``scaled_dot_product_attention`` with grouped-query heads expanded: ``-> [b, k, heads * head_dim]``."""
    if k.shape[1] != q.shape[1]:
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
    o = nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=scale)
    return o.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _select_rows(routed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the routed positions padded with the first skipped ones to ``k_max`` (sorted, distinct).

    Returns ``index`` int64 ``[b, k_max]`` and ``valid`` bool ``[b, k_max]`` (True where the position is routed).
    """
    counts = routed.sum(1)
    k_max = int(counts.max())
    skipped = ~routed
    skip_rank = torch.cumsum(skipped, dim=1) - 1
    take = routed | (skipped & (skip_rank < (k_max - counts)[:, None]))
    index = take.nonzero()[:, 1].view(routed.shape[0], k_max)
    return index, torch.gather(routed, 1, index)


def _causal_mask(index: torch.Tensor, past: int, kv_len: int) -> torch.Tensor:
    """Bool ``[b, 1, k, kv_len]``: the query at chunk position ``index`` sees keys at absolute ``<= past + index``."""
    keys = torch.arange(kv_len, device=index.device)
    return (keys[None, None, None, :] <= (index + past)[:, None, :, None])


def _mask_rows(mask: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` of a 4-D mask ``[b|1, h|1, t, T]`` -> ``[b, h|1, k, T]``."""
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be 4-D [b|1, h|1, t, T] or None, got {list(mask.shape)}")
    b, k = index.shape
    m = mask.expand(b, *mask.shape[1:])
    return torch.gather(m, 2, index[:, None, :, None].expand(b, m.shape[1], k, m.shape[3]))


def _scale(x: torch.Tensor, s: torch.Tensor | None) -> torch.Tensor:
    return x if s is None else x * s[..., None].to(x.dtype)


class SkipRouting(nn.Module):
    """What every SkipLayer shares: ``router``, ``options`` and ``parts`` turned into Algorithm 1/2 (``route_forward``).

    ``SkipLayer`` wraps any layer with it; framework layers can also inherit it directly (megatron-core's
    ``SkipLayerTransformerLayer`` keeps the ``TransformerLayer`` class and parameter names that way). Subclasses set
    ``router`` (a :class:`SkipRouter`), ``options`` and ``parts`` and ``last_route = None`` in ``__init__``.
    ``skip_layer_aux_loss`` and the metrics collect every ``SkipRouting`` module of a model.
    """

    router: SkipRouter
    options: SkipLayerOptions
    parts: SkipLayerParts
    last_route: RouterOutput | None

    def group_size(self, num_tokens: int) -> int:
        """Gsize for a call over ``num_tokens`` (= b * t) tokens."""
        if self.options.group_size is not None:
            return self.options.group_size
        return max(1, math.ceil(self.options.capacity * num_tokens))

    def route_forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None,
                      ctx: Any = None, generator: torch.Generator | None = None,
                      route: RouterOutput | None = None) -> torch.Tensor:
        """Algorithm 1 (and 2 with ``cache``) on ``x`` ``[b, t, d]``; see :class:`SkipLayer`."""
        if not isinstance(x, torch.Tensor) or x.dim() != 3:
            raise ValueError(f"SkipLayer {self.options.layer_id}: x must be [b, t, d], got "
                             f"{list(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
        if route is None:
            route = self.router(x, generator=generator)
        elif route.hard.shape != x.shape[:2]:
            raise ValueError(f"route.hard must be [b, t] = {list(x.shape[:2])}, got {list(route.hard.shape)}")
        self.last_route = route
        parts = self.parts
        b, t, d = x.shape
        past = 0 if cache is None else _cache_length(cache, self.options.layer_id)

        h = parts.attn_norm(x, ctx)
        k, v = parts.key_value(h, ctx)
        if cache is not None:  # Algorithm 2, line 2: K/V always written, so every layer's cache has every position
            k, v = cache.update(k, v, self.options.layer_id)
        kv_len = k.shape[2]

        if route.dense_gate is not None or self.options.implementation == "dense":
            return self._dense(x, h, k, v, route, attention_mask, past, ctx)

        base = _scale(x, route.skip_scale)
        routed = route.routed
        if not bool(routed.any()):  # Algorithm 2: no query, attention or FFN work at all
            return base
        if bool(routed.all()):  # nothing to skip: the dense path does exactly the routed work, without gathers
            return self._dense(x, h, k, v, route, attention_mask, past, ctx)
        index, valid = _select_rows(routed)
        h_sel = gather_tokens(h, index, batch_first=True, check_indices=False)
        mask = _causal_mask(index, past, kv_len) if attention_mask is None else _mask_rows(attention_mask, index)
        o = parts.attend(parts.query(h_sel, index, ctx), k, v, mask, ctx)
        rs = None if route.routed_scale is None else torch.gather(route.routed_scale, 1, index)
        x1 = gather_tokens(x, index, batch_first=True, check_indices=False) + _scale(o, rs)

        # FFN over the routed tokens of the whole batch, flattened, in groups of Gsize (last group padded)
        slots = valid.reshape(-1).nonzero().squeeze(1)
        n = slots.numel()
        gsize = self.group_size(b * t)
        groups = math.ceil(n / gsize)
        x1v = gather_tokens(x1.reshape(1, -1, d), slots[None], batch_first=True, check_indices=False)
        x1g = nn.functional.pad(x1v, (0, 0, 0, groups * gsize - n))  # zero rows, dropped after the FFN
        y = parts.ffn(x1g.view(groups, gsize, d), ctx).reshape(1, groups * gsize, d)[:, :n]
        rs_flat = None if rs is None else rs.reshape(1, -1)[:, slots]
        out = x1v + _scale(y, rs_flat)
        # the valid slots enumerate routed tokens in (row, position) order, like the flattened routed mask
        targets = routed.reshape(-1).nonzero().squeeze(1)[None]
        return scatter_tokens(base.reshape(1, b * t, d), out, targets, batch_first=True,
                              check_indices=False).view(b, t, d)

    def _dense(self, x, h, k, v, route: RouterOutput, attention_mask, past: int, ctx) -> torch.Tensor:
        """Every token runs the layer; the mask selects (the reference, HighwayNet, and the all-routed case)."""
        parts = self.parts
        b, t, _ = x.shape
        index = torch.arange(t, device=x.device).expand(b, t)
        mask = _causal_mask(index, past, k.shape[2]) if attention_mask is None else attention_mask
        x1 = x + _scale(parts.attend(parts.query(h, index, ctx), k, v, mask, ctx), route.routed_scale)
        y = x1 + _scale(parts.ffn(x1, ctx), route.routed_scale)
        if route.dense_gate is not None:  # HighwayNet: t * layer(x) + (1 - t) * x
            gate = route.dense_gate[..., None].to(x.dtype)
            return gate * y + (1 - gate) * x
        return torch.where(route.routed[..., None], y, _scale(x, route.skip_scale))


class SkipLayer(SkipRouting):
    """Wrap a transformer layer so that each token runs it only when the router says so.

    Args:
        layer: the wrapped layer (registered as ``self.layer``; its parameters keep their names under ``layer.``).
        options: :class:`SkipLayerOptions`.
        parts: its decomposition; default ``layer`` itself when it implements :class:`SkipLayerParts`.
        hidden_size: d (default: ``layer.hidden_size``).

    ``forward(x, attention_mask=None, cache=None, ctx=None, generator=None, route=None) -> [b, t, d]``;
    ``attention_mask`` None means causal, else a 4-D mask over the chunk's queries and all keys (bool, True =
    attend, or additive). ``route`` forces the routing (e.g. recorded decisions), otherwise the router decides.
    After each call ``last_route`` holds the :class:`RouterOutput` (for the aux loss and the metrics).
    """

    def __init__(self, layer: nn.Module, options: SkipLayerOptions | None = None, *,
                 parts: SkipLayerParts | None = None, hidden_size: int | None = None) -> None:
        super().__init__()
        options = options or SkipLayerOptions()
        if not isinstance(options, SkipLayerOptions):
            raise TypeError(f"options must be SkipLayerOptions, got {type(options).__name__}")
        parts = parts if parts is not None else layer
        if not isinstance(parts, SkipLayerParts):
            raise TypeError(f"{type(layer).__name__} does not implement SkipLayerParts; pass parts= (an adapter)")
        hidden_size = hidden_size if hidden_size is not None else getattr(layer, "hidden_size", None)
        if not isinstance(hidden_size, int):
            raise ValueError("hidden_size is needed (the layer has no int attribute hidden_size)")
        self.layer = layer
        object.__setattr__(self, "parts", parts)  # not registered: it is ``layer`` itself or a plain adapter
        self.options = options
        self.router = SkipRouter(hidden_size, options.router, capacity=options.capacity,
                                 temperature=options.temperature, gumbel_noise=options.gumbel_noise,
                                 threshold=options.threshold)
        self.train(layer.training)  # converting an eval-mode model keeps it in eval mode (no router noise)
        self.last_route: RouterOutput | None = None

    def extra_repr(self) -> str:
        o = self.options
        return f"layer_id={o.layer_id}, capacity={o.capacity}, implementation={o.implementation}"

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, cache: Any = None,
                ctx: Any = None, generator: torch.Generator | None = None,
                route: RouterOutput | None = None) -> torch.Tensor:
        return self.route_forward(x, attention_mask, cache, ctx, generator, route)


def _cache_length(cache: Any, layer_idx: int) -> int:
    if hasattr(cache, "get_seq_length"):
        return int(cache.get_seq_length(layer_idx))
    raise TypeError(f"cache must have get_seq_length(layer_idx) and update(k, v, layer_idx), got {type(cache)}")


class SkipKVCache:
    """Minimal per-layer KV cache with the Hugging Face ``Cache`` interface that SkipLayer uses."""

    def __init__(self) -> None:
        self.keys: dict[int, torch.Tensor] = {}
        self.values: dict[int, torch.Tensor] = {}

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.keys[layer_idx].shape[2] if layer_idx in self.keys else 0

    def update(self, k: torch.Tensor, v: torch.Tensor, layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        if layer_idx in self.keys:
            k = torch.cat([self.keys[layer_idx], k], dim=2)
            v = torch.cat([self.values[layer_idx], v], dim=2)
        self.keys[layer_idx], self.values[layer_idx] = k, v
        return k, v


# ----------------------------------------------------------------------------------------------------------------
# Collecting the capacity loss and the metrics
# ----------------------------------------------------------------------------------------------------------------


def find_skip_layers(model: nn.Module) -> list[SkipRouting]:
    """Every SkipLayer under ``model``, in module order."""
    return [m for m in model.modules() if isinstance(m, SkipRouting)]


def anneal_skip_layers(model: nn.Module, step: int) -> dict[str, float]:
    """Set every SkipLayer router's noise and temperature for optimizer step ``step`` (call before each step).

    Values come from each layer's options (:meth:`SkipLayerOptions.noise_at` / ``temperature_at``); layers without
    ``anneal_steps`` keep their constant values. Returns ``{"skip_layer/gumbel_noise": mean, "skip_layer/temperature":
    mean}`` over the learned routers (empty without any).
    """
    noises, temps = [], []
    for layer in find_skip_layers(model):
        layer.router.gumbel_noise = layer.options.noise_at(step)
        layer.router.temperature = layer.options.temperature_at(step)
        if layer.router.learned:
            noises.append(layer.router.gumbel_noise)
            temps.append(layer.router.temperature)
    if not noises:
        return {}
    return {"skip_layer/gumbel_noise": sum(noises) / len(noises), "skip_layer/temperature": sum(temps) / len(temps)}


@contextmanager
def sampled_routing(model: nn.Module, noise: float | None = None) -> Iterator[nn.Module]:
    """Evaluate ``model`` with training-style sampled routing: eval-mode routers add Gumbel noise of scale ``noise``
    (default each layer's configured starting ``gumbel_noise``) instead of taking the argmax; restored on exit."""
    if noise is not None and not noise >= 0.0:
        raise ValueError(f"noise must be >= 0 or None, got {noise!r}")
    layers = find_skip_layers(model)
    saved = [layer.router.eval_noise for layer in layers]
    try:
        for layer in layers:
            layer.router.eval_noise = float(layer.options.gumbel_noise if noise is None else noise)
        yield model
    finally:
        for layer, value in zip(layers, saved):
            layer.router.eval_noise = value


def skip_layer_aux_loss(model: nn.Module) -> torch.Tensor:
    """``Σ_i λ_i (r_i − P_i)²`` over the SkipLayers of ``model`` with a learned router, from their last forward.

    ``r_i`` is the mean of the hard decisions (exact capacities in forward, straight-through gradient to W_G). Add
    it to the loss: ``loss = nll + skip_layer_aux_loss(model)``. Layers that have not run yet contribute nothing;
    a model without SkipLayers gives a zero tensor.
    """
    terms = []
    for layer in find_skip_layers(model):
        route = layer.last_route
        if route is None or not layer.router.learned or layer.options.aux_loss_weight == 0.0:
            continue
        terms.append(layer.options.aux_loss_weight * (route.hard.mean() - layer.options.capacity) ** 2)
    if not terms:
        p = next(model.parameters(), None)
        return torch.zeros((), device=p.device if p is not None else None)
    return torch.stack(terms).sum()


def skip_layer_capacities(model: nn.Module) -> dict[int, float]:
    """``{layer_id: r}`` from each SkipLayer's last forward (fraction of tokens that ran the layer)."""
    return {layer.options.layer_id: float(layer.last_route.hard.detach().float().mean())
            for layer in find_skip_layers(model) if layer.last_route is not None}


def skip_layer_metrics(model: nn.Module) -> dict[str, float]:
    """Metrics named like ``random_ltd/monitor.py``: ``skip_layer/capacity_layer_{i}``, ``skip_layer/capacity_mean``,
    ``skip_layer/aux_loss`` (weighted, as added to the loss)."""
    caps = skip_layer_capacities(model)
    out = {f"skip_layer/capacity_layer_{i}": r for i, r in sorted(caps.items())}
    if caps:
        out["skip_layer/capacity_mean"] = sum(caps.values()) / len(caps)
    out["skip_layer/aux_loss"] = float(skip_layer_aux_loss(model).detach())
    return out


# ----------------------------------------------------------------------------------------------------------------
# A tiny plain-torch decoder (tests, benchmark, examples)
# ----------------------------------------------------------------------------------------------------------------


class TinyDecoderLayer(nn.Module, SkipLayerParts):
    """Pre-LN decoder layer (LayerNorm, q/k/v/o projections, GELU MLP) that exposes :class:`SkipLayerParts`.

    ``forward(x, cache=None)`` is the plain dense layer (causal), used by the dense baseline models.
    """

    def __init__(self, hidden_size: int, num_heads: int, ffn_mult: int = 4) -> None:
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} must be divisible by num_heads {num_heads}")
        self.hidden_size, self.num_heads, self.head_dim = hidden_size, num_heads, hidden_size // num_heads
        self.ln1 = nn.LayerNorm(hidden_size)
        self.q_proj = nn.Linear(hidden_size, hidden_size)
        self.k_proj = nn.Linear(hidden_size, hidden_size)
        self.v_proj = nn.Linear(hidden_size, hidden_size)
        self.o_proj = nn.Linear(hidden_size, hidden_size)
        self.ln2 = nn.LayerNorm(hidden_size)
        self.mlp = nn.Sequential(nn.Linear(hidden_size, ffn_mult * hidden_size), nn.GELU(),
                                 nn.Linear(ffn_mult * hidden_size, hidden_size))

    def _heads(self, y: torch.Tensor) -> torch.Tensor:
        return y.view(y.shape[0], y.shape[1], self.num_heads, self.head_dim).transpose(1, 2)

    def attn_norm(self, x, ctx=None):
        return self.ln1(x)

    def key_value(self, h, ctx=None):
        return self._heads(self.k_proj(h)), self._heads(self.v_proj(h))

    def query(self, h, index, ctx=None):
        return self._heads(self.q_proj(h))

    def attend(self, q, k, v, mask, ctx=None):
        return self.o_proj(sdpa_attend(q, k, v, mask))

    def ffn(self, x, ctx=None):
        return self.mlp(self.ln2(x))

    def forward(self, x: torch.Tensor, cache: Any = None, layer_idx: int = 0) -> torch.Tensor:
        h = self.ln1(x)
        k, v = self.key_value(h)
        past = 0
        if cache is not None:
            past = _cache_length(cache, layer_idx)
            k, v = cache.update(k, v, layer_idx)
        index = torch.arange(x.shape[1], device=x.device).expand(x.shape[0], -1)
        x1 = x + self.attend(self.query(h, index), k, v, _causal_mask(index, past, k.shape[2]))
        return x1 + self.ffn(x1)


class TinyDecoder(nn.Module):
    """Byte-level decoder-only LM: embeddings + learned positions, ``num_layers`` layers, final LN, tied head.

    Args:
        skip: when given, the layers listed in ``skip_layers`` (default: all) are SkipLayers with these options
            (their ``layer_id`` set to the layer index).
    """

    def __init__(self, vocab_size: int = 256, hidden_size: int = 64, num_heads: int = 4, num_layers: int = 4,
                 max_len: int = 256, ffn_mult: int = 4, skip: SkipLayerOptions | None = None,
                 skip_layers: list[int] | None = None) -> None:
        super().__init__()
        self.max_len = max_len
        self.embed = nn.Embedding(vocab_size, hidden_size)
        self.pos = nn.Embedding(max_len, hidden_size)
        wrap = set(range(num_layers) if skip_layers is None else skip_layers) if skip is not None else set()
        layers = []
        for i in range(num_layers):
            layer = TinyDecoderLayer(hidden_size, num_heads, ffn_mult)
            if i in wrap:
                layer = SkipLayer(layer, dataclasses.replace(skip, layer_id=i))
            layers.append(layer)
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(hidden_size)
        nn.init.normal_(self.embed.weight, std=0.02)
        nn.init.normal_(self.pos.weight, std=0.02)

    def forward(self, tokens: torch.Tensor, cache: SkipKVCache | None = None,
                routes: list[RouterOutput | None] | None = None,
                generator: torch.Generator | None = None) -> torch.Tensor:
        """Logits ``[b, t, vocab]``; ``cache`` continues from its length; ``routes[i]`` forces layer i's routing."""
        past = 0 if cache is None else cache.get_seq_length(0)
        if past + tokens.shape[1] > self.max_len:
            raise ValueError(f"sequence length {past + tokens.shape[1]} exceeds max_len {self.max_len}")
        pos = torch.arange(past, past + tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, SkipLayer):
                x = layer(x, cache=cache, generator=generator, route=routes[i] if routes is not None else None)
            else:
                x = layer(x, cache=cache, layer_idx=i)
        return nn.functional.linear(self.norm(x), self.embed.weight)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, max_new_tokens: int) -> tuple[torch.Tensor, list[list[torch.Tensor]]]:
        """Greedy decoding with a KV cache (Algorithm 2 per layer).

        Returns the tokens ``[b, t + max_new_tokens]`` and, per forward call (prefill, then one per new token), the
        hard decisions of each layer (None for plain layers), to replay them in a full recomputation.
        """
        cache = SkipKVCache()
        tokens, decisions = prompt, []
        step_input = prompt
        for _ in range(max_new_tokens):
            logits = self(step_input, cache=cache)
            decisions.append([lay.last_route.hard.clone() if isinstance(lay, SkipLayer) else None
                              for lay in self.layers])
            step_input = logits[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, step_input], dim=1)
        return tokens, decisions
