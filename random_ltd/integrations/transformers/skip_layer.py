"""SkipLayer for Hugging Face decoder layers: ``GPT2Block`` and ``LlamaDecoderLayer`` (transformers 5.x).

``convert_to_skip_layer(model, ds_config)`` reads the validated ``skip_layer`` block of a DeepSpeed config and
replaces the listed decoder layers by :class:`HFSkipLayer` modules, which call the layer's own submodules through a
:class:`~random_ltd.layers.skip_layer.SkipLayerParts` adapter:

* GPT-2: ``ln_1``; the fused ``c_attn`` Conv1D split into its query columns (routed tokens only) and its key/value
  columns (every token); ``c_proj`` and ``resid_dropout``; ``ln_2`` + ``mlp``.
* Llama: ``input_layernorm``; ``q_proj`` (routed tokens, rotary ``(cos, sin)`` gathered at their positions) and
  ``k_proj``/``v_proj`` (every token, rotary applied); grouped-query heads; ``o_proj``; ``post_attention_layernorm`` +
  ``mlp``.

Masks: ``None`` (causal, offset by the cache length) or the 4-D mask the model builds (bool, True = attend, for
SDPA; additive float for eager), whose query rows are gathered for the routed tokens. The model's ``Cache`` is used
as is (``update(k, v, layer_idx)``), so ``generate()`` works: every layer writes K/V for every token.

Parameter names change from ``...layers.{i}.<name>`` to ``...layers.{i}.layer.<name>``, plus
``...layers.{i}.router.proj.weight`` (W_G). ``output_hidden_states`` works (the wrapper records what 5.x's hook on the
layer class would). Not supported (errors): GPT-2 cross-attention, ``output_attentions``, flash-attention / flex
masks. Gradient checkpointing of the wrapped layers is not supported (a recompute would redraw the router noise).
"""

from __future__ import annotations

import inspect
import os
from typing import Any

import torch
from torch import nn
from transformers.models.gpt2.modeling_gpt2 import GPT2Block
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, rotate_half

from random_ltd.config import SkipLayerConfig
from random_ltd.integrations.transformers._cache import find_cache
from random_ltd.layers.skip_layer import SkipLayer, SkipLayerOptions, SkipLayerParts, sdpa_attend, skip_layer_metrics
from random_ltd.ops import gather_positions

__all__ = ["GPT2Parts", "HFSkipLayer", "LlamaParts", "convert_to_skip_layer", "log_skip_layer_metrics"]


def _heads(y: torch.Tensor, head_dim: int) -> torch.Tensor:
    return y.view(y.shape[0], y.shape[1], -1, head_dim).transpose(1, 2)


class GPT2Parts(SkipLayerParts):
    """GPT2Block as Figure 3's parts; the fused ``c_attn`` is applied in two column slices."""

    def __init__(self, block: GPT2Block) -> None:
        if hasattr(block, "crossattention"):
            raise ValueError("SkipLayer does not support GPT-2 blocks with cross-attention (add_cross_attention)")
        self.block = block

    def attn_norm(self, x, ctx):
        return self.block.ln_1(x)

    def _proj(self, h, lo, hi):
        c = self.block.attn.c_attn  # Conv1D: y = x @ weight + bias, weight [d, 3d]
        return torch.addmm(c.bias[lo:hi], h.reshape(-1, h.shape[-1]), c.weight[:, lo:hi]).view(*h.shape[:-1], -1)

    def key_value(self, h, ctx):
        d, hd = self.block.attn.embed_dim, self.block.attn.head_dim
        return _heads(self._proj(h, d, 2 * d), hd), _heads(self._proj(h, 2 * d, 3 * d), hd)

    def query(self, h, index, ctx):
        return _heads(self._proj(h, 0, self.block.attn.embed_dim), self.block.attn.head_dim)

    def attend(self, q, k, v, mask, ctx):
        attn = self.block.attn
        o = sdpa_attend(q, k, v, mask, scale=attn.scaling, dropout=attn.attn_dropout.p if attn.training else 0.0)
        return attn.resid_dropout(attn.c_proj(o))

    def ffn(self, x, ctx):
        return self.block.mlp(self.block.ln_2(x))


def _rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    return x * cos + rotate_half(x) * sin


class LlamaParts(SkipLayerParts):
    """LlamaDecoderLayer as Figure 3's parts; ``ctx`` is the model's ``position_embeddings`` ``(cos, sin)``."""

    def __init__(self, layer: LlamaDecoderLayer) -> None:
        self.layer = layer

    @staticmethod
    def _cos_sin(ctx):
        if ctx is None:
            raise ValueError("LlamaDecoderLayer needs position_embeddings=(cos, sin) (LlamaModel passes them)")
        return ctx

    def attn_norm(self, x, ctx):
        return self.layer.input_layernorm(x)

    def key_value(self, h, ctx):
        attn = self.layer.self_attn
        cos, sin = self._cos_sin(ctx)
        k = _rotary(_heads(attn.k_proj(h), attn.head_dim), cos, sin)
        return k, _heads(attn.v_proj(h), attn.head_dim)

    def query(self, h, index, ctx):
        attn = self.layer.self_attn
        cos, sin = gather_positions(tuple(self._cos_sin(ctx)), index)
        return _rotary(_heads(attn.q_proj(h), attn.head_dim), cos, sin)

    def attend(self, q, k, v, mask, ctx):
        attn = self.layer.self_attn
        dropout = attn.attention_dropout if attn.training else 0.0
        return attn.o_proj(sdpa_attend(q, k, v, mask, scale=attn.scaling, dropout=dropout))

    def ffn(self, x, ctx):
        return self.layer.mlp(self.layer.post_attention_layernorm(x))


_PARTS = {GPT2Block: GPT2Parts, LlamaDecoderLayer: LlamaParts}


class HFSkipLayer(SkipLayer):
    """A SkipLayer called like the decoder layer it wraps (arguments bound with that layer's ``forward`` signature:
    GPT-2 passes the cache and the mask positionally, Llama by keyword)."""

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        bound = inspect.signature(type(self.layer).forward).bind(self.layer, *args, **kwargs).arguments
        extra = bound.get("kwargs", {})
        hidden = bound["hidden_states"]
        if bound.get("encoder_hidden_states") is not None:
            raise ValueError("SkipLayer does not support cross-attention (encoder_hidden_states)")
        mask = bound.get("attention_mask")
        if mask is not None and (not isinstance(mask, torch.Tensor) or mask.dim() != 4):
            raise ValueError(f"SkipLayer needs attention_mask None or a 4-D tensor (SDPA/eager attention), got "
                             f"{type(mask).__name__}; flash-attention / flex masks are not supported")
        out = super().forward(hidden, attention_mask=mask, cache=find_cache(bound),
                              ctx=bound.get("position_embeddings", extra.get("position_embeddings")))
        _record_hidden_states(hidden, out)
        return out


def _record_hidden_states(hidden: torch.Tensor, out: torch.Tensor) -> None:
    """Do what transformers 5.x's output-capturing hook on the decoder-layer class does (that hook sits on the
    wrapped layer, which a SkipLayer never calls), so ``output_hidden_states`` still has one entry per layer."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # another transformers layout: hidden states are then not recorded for this layer
        return
    collected = _active_collector.get()
    if collected is None:
        return
    if "attentions" in collected:
        raise NotImplementedError("output_attentions is not supported with SkipLayer (queries exist only for the "
                                  "routed tokens)")
    if "hidden_states" not in collected:
        return
    states, selection = collected["hidden_states"], collected.get("_hidden_states_layers")
    for h in ((hidden, out) if not states else (out,)):  # the first entry is the input of layer 0
        states.append(h if selection is None or len(states) in selection else None)


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and all(isinstance(m, (*_PARTS, HFSkipLayer))
                                                                     for m in module):
            return module
    raise ValueError(f"no nn.ModuleList of GPT2Block or LlamaDecoderLayer found in {type(model).__name__}")


def convert_to_skip_layer(model: nn.Module,
                          config: SkipLayerConfig | dict | str | os.PathLike[str]) -> list[HFSkipLayer]:
    """Wrap the decoder layers named by the ``skip_layer`` block (all by default) in place; returns the wrappers.

    ``config``: a :class:`SkipLayerConfig`, or a whole DeepSpeed config (dict or JSON path) holding the block. A
    disabled or missing block leaves the model unchanged and returns ``[]``. New router weights are created on the
    layer's device and dtype.

    Raises:
        ConfigError: a bad block, or layer ids outside the model. ValueError: no supported decoder layers.
    """
    cfg = config if isinstance(config, SkipLayerConfig) else SkipLayerConfig.from_deepspeed(config)
    if not cfg.enabled:
        return []
    layers = _decoder_layers(model)
    wrapped = []
    for i in cfg.layer_ids(len(layers)):
        layer = layers[i]
        if isinstance(layer, HFSkipLayer):
            raise ValueError(f"layer {i} is already a SkipLayer")
        options: SkipLayerOptions = cfg.options(i)
        param = next(layer.parameters())
        hidden = layer.hidden_size if isinstance(layer, LlamaDecoderLayer) else layer.attn.embed_dim
        skip = HFSkipLayer(layer, options, parts=_PARTS[type(layer)](layer), hidden_size=hidden)
        skip.router.to(device=param.device, dtype=param.dtype)
        layers[i] = skip
        wrapped.append(skip)
    return wrapped


def log_skip_layer_metrics(engine: Any, model: nn.Module | None = None) -> dict[str, float]:
    """Write ``skip_layer/capacity_layer_{i}``, ``skip_layer/capacity_mean`` and ``skip_layer/aux_loss`` through a
    DeepSpeed engine's monitor (W&B/TensorBoard/CSV; x-axis ``engine.global_samples`` like random_ltd/monitor.py).

    Call after the optimizer step; returns the metrics (also when no monitor is enabled).
    """
    model = model if model is not None else engine.module
    metrics = skip_layer_metrics(model)
    monitor = getattr(engine, "monitor", None)
    if monitor is not None and getattr(monitor, "enabled", False):
        step = getattr(engine, "global_samples", 0)
        monitor.write_events([(k, v, step) for k, v in metrics.items()])
    return metrics
