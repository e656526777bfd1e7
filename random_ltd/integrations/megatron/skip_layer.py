"""SkipLayer for megatron-core GPT: ``SkipLayerTransformerLayer``, a ``TransformerLayer`` with a learned token router.

The class inherits megatron-core's ``TransformerLayer`` (its submodules, parameter names, ``isinstance`` checks) and
``random_ltd.layers.skip_layer.SkipRouting`` (the router and Algorithm 1/2), and exposes its own submodules as
``SkipLayerParts``: input norm; ``linear_qkv`` split into megatron's per-group ``[q..., k, v]`` layout; rotary from
the block's ``rotary_pos_emb`` (queries get their own positions' rows); attention (SDPA, megatron's default
``1/sqrt(head_dim)`` scale and ``attention_dropout``) + ``linear_proj``; ``pre_mlp_layernorm`` + ``mlp``. Both residual
branches get ``hidden_dropout`` as megatron's bias-dropout-add does. Routed tokens attend over every token's key.

Insert it with ``gpt_skip_layer_specs`` (per-layer specs; the ``skip_layer`` block names the layers). The router
weights are the only new parameters (``decoder.layers.<i>.router.*``). Collect the auxiliary capacity loss with
``random_ltd.layers.skip_layer_aux_loss(model)``.

Refused with an error: tensor/sequence/context/pipeline parallelism > 1 (the router's noise and decisions are not
coordinated across ranks yet), MLA, CUDA graphs, full recompute (it would redraw the router noise), packed
sequences, cross-attention, attention masks other than causal (``attention_mask=None``) and inference contexts.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
from megatron.core.models.common.embeddings.rotary_pos_embedding import apply_rotary_pos_emb
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from random_ltd.config import SkipLayerConfig
from random_ltd.layers.routers import SkipRouter
from random_ltd.layers.skip_layer import SkipLayerOptions, SkipLayerParts, SkipRouting, sdpa_attend
from random_ltd.ops import gather_positions

__all__ = ["SkipLayerTransformerLayer", "gpt_skip_layer_specs", "skip_layer_unsupported_reasons"]


def skip_layer_unsupported_reasons(config: Any) -> list[str]:
    """Why SkipLayer cannot run on a megatron-core ``TransformerConfig`` (empty when it can)."""
    reasons = []
    for name in ("tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size"):
        if getattr(config, name, 1) > 1:
            reasons.append(f"{name}={getattr(config, name)}: router decisions are not coordinated across ranks yet")
    if getattr(config, "sequence_parallel", False):
        reasons.append("sequence_parallel=True is not supported")
    if getattr(config, "multi_latent_attention", False):
        reasons.append("multi_latent_attention=True is not supported")
    if getattr(config, "cuda_graph_impl", "none") != "none":
        reasons.append("CUDA graphs: routed token counts change every step")
    if getattr(config, "recompute_granularity", None) == "full":
        reasons.append("recompute_granularity='full': a recompute would redraw the router's noise")
    if getattr(config, "attention_output_gate", False):
        reasons.append("attention_output_gate=True is not supported")
    if getattr(config, "num_moe_experts", None):
        reasons.append("MoE layers are not supported")
    return reasons


class _MegatronParts(SkipLayerParts):
    """A megatron-core ``TransformerLayer``'s submodules as Figure 3's parts (``ctx`` = ``rotary_pos_emb`` or None)."""

    def __init__(self, layer: TransformerLayer) -> None:
        self.layer = layer
        attn = layer.self_attention
        self.heads = attn.num_attention_heads_per_partition
        self.groups = attn.num_query_groups_per_partition
        self.head_dim = attn.hidden_size_per_attention_head

    def _qkv(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``linear_qkv`` on ``[b, n, d]``, split in megatron's layout: per query group ``[q x heads/groups, k, v]``."""
        attn = self.layer.self_attention
        mixed, bias = attn.linear_qkv(h)
        if bias is not None:
            mixed = mixed + bias
        per = self.heads // self.groups
        mixed = mixed.view(*h.shape[:2], self.groups, (per + 2) * self.head_dim)
        q, k, v = torch.split(mixed, [per * self.head_dim, self.head_dim, self.head_dim], dim=-1)
        q = q.reshape(*h.shape[:2], self.heads, self.head_dim)
        if attn.q_layernorm is not None:
            q = attn.q_layernorm(q)
        if attn.k_layernorm is not None:
            k = attn.k_layernorm(k)
        return q, k, v  # [b, n, heads|groups, hd]

    def _rope(self, t: torch.Tensor, freqs: torch.Tensor | None) -> torch.Tensor:
        """Rotary on ``t`` ``[b, n, heads, hd]`` with ``freqs`` ``[n, 1|b, 1, hd]`` -> ``[b, heads, n, hd]``."""
        t = t.transpose(0, 1)
        if freqs is not None:
            t = apply_rotary_pos_emb(t, freqs, config=self.layer.config)
        return t.permute(1, 2, 0, 3)

    def attn_norm(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        return self.layer.input_layernorm(x)

    def key_value(self, h: torch.Tensor, ctx: Any) -> tuple[torch.Tensor, torch.Tensor]:
        _, k, v = self._qkv(h)
        freqs = None if ctx is None else ctx[: h.shape[1]]
        return self._rope(k, freqs), v.permute(0, 2, 1, 3)

    def query(self, h: torch.Tensor, index: torch.Tensor, ctx: Any) -> torch.Tensor:
        q, _, _ = self._qkv(h)  # the k/v columns of these rows are recomputed: one fused GEMM is cheaper to keep
        return self._rope(q, None if ctx is None else gather_positions(ctx, index))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, ctx: Any) -> torch.Tensor:
        layer, cfg = self.layer, self.layer.config
        o = sdpa_attend(q, k, v, mask, scale=1.0 / math.sqrt(self.head_dim),
                        dropout=cfg.attention_dropout if layer.training else 0.0)
        out, bias = layer.self_attention.linear_proj(o)
        if bias is not None:
            out = out + bias
        return nn.functional.dropout(out, p=layer.hidden_dropout, training=layer.training)

    def ffn(self, x: torch.Tensor, ctx: Any) -> torch.Tensor:
        layer = self.layer
        out, bias = layer.mlp(layer.pre_mlp_layernorm(x))
        if bias is not None:
            out = out + bias
        return nn.functional.dropout(out, p=layer.hidden_dropout, training=layer.training)


class SkipLayerTransformerLayer(SkipRouting, TransformerLayer):
    """megatron-core ``TransformerLayer`` whose tokens are routed through it or around it (see the module docstring).

    Extra constructor argument (``ModuleSpec.params``): ``skip_options`` (:class:`SkipLayerOptions`; ``layer_id`` is
    set from the global ``layer_number``).
    """

    def __init__(self, *args: Any, skip_options: SkipLayerOptions, **kwargs: Any) -> None:
        TransformerLayer.__init__(self, *args, **kwargs)
        reasons = skip_layer_unsupported_reasons(self.config)
        if reasons:
            raise NotImplementedError(f"SkipLayer layer {self.layer_number - 1}: " + "; ".join(reasons))
        if not isinstance(skip_options, SkipLayerOptions):
            raise TypeError(f"skip_options must be SkipLayerOptions, got {type(skip_options).__name__}")
        self.options = dataclasses.replace(skip_options, layer_id=self.layer_number - 1)
        self.router = SkipRouter(self.config.hidden_size, skip_options.router, capacity=skip_options.capacity,
                                 temperature=skip_options.temperature, gumbel_noise=skip_options.gumbel_noise,
                                 threshold=skip_options.threshold).to(dtype=self.config.params_dtype)
        object.__setattr__(self, "parts", _MegatronParts(self))  # plain helper object, not a submodule
        self.last_route = None

    def forward(self, hidden_states: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                **kwargs: Any):
        for name in ("context", "inference_context", "packed_seq_params", "attention_bias", "rotary_pos_cos",
                     "rotary_pos_sin", "rotary_pos_cos_sin", "sequence_len_offset"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"SkipLayer layer {self.options.layer_id}: {name} is not supported")
        if attention_mask is not None:
            raise NotImplementedError(f"SkipLayer layer {self.options.layer_id}: only the causal mask (attention_mask"
                                      "=None, GPT's default) is supported; got an explicit attention_mask")
        x = hidden_states.transpose(0, 1)  # megatron [s, b, h] -> [b, s, h]
        out = self.route_forward(x, attention_mask=None, ctx=kwargs.get("rotary_pos_emb"))
        return out.transpose(0, 1).contiguous(), None


def gpt_skip_layer_specs(
    num_layers: int,
    skip_config: SkipLayerConfig | dict,
    *,
    base_spec: ModuleSpec | None = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec for ``GPTModel`` with ``SkipLayerTransformerLayer`` on the layers the block names.

    Args:
        num_layers: ``TransformerConfig.num_layers``.
        skip_config: a :class:`SkipLayerConfig`, or a DeepSpeed config dict holding the ``skip_layer`` block.
        base_spec: the layer spec to start from (default: megatron's local GPT spec).

    Raises:
        ConfigError: a bad block or layer ids outside the model. ValueError: the block is disabled.
    """
    from megatron.core.models.gpt import gpt_layer_specs as mspecs

    cfg = skip_config if isinstance(skip_config, SkipLayerConfig) else SkipLayerConfig.from_deepspeed(skip_config)
    if not cfg.enabled:
        raise ValueError("skip_layer.enabled is false: use megatron's own spec for a model without SkipLayer")
    base_spec = base_spec or mspecs.get_gpt_layer_local_spec()
    ids = set(cfg.layer_ids(num_layers))
    specs = [dataclasses.replace(base_spec, module=SkipLayerTransformerLayer, params={**base_spec.params,
                                                                                       "skip_options": cfg.options(i)})
             if i in ids else base_spec for i in range(num_layers)]
    return TransformerBlockSubmodules(layer_specs=specs, layer_norm=mspecs.LNImpl)
