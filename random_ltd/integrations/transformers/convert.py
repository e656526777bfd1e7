"""``convert``: random-LTD for Hugging Face transformers models (GPT-2, BERT/RoBERTa, Llama-style decoders, ViT).

Built on the generic wrapper (``random_ltd.layers``): the middle layers are found by object and index, wrapped in
place (class swap; parameters, state-dict keys and ``isinstance`` checks unchanged), and in training each one runs on
a random sorted subset of its tokens. What this adapter adds for transformers:

* Dropping happens only in a training-mode forward with autograd enabled, decided when the layer is called (outside
  gradient checkpointing, so a reentrant checkpoint's no-grad first pass and its recompute agree). ``eval()``, and
  ``generate()`` (which runs under ``torch.no_grad``) even on a model left in training mode, run the original layers
  untouched: outputs are bitwise the unconverted model's and the KV cache is complete.
* Hidden states: 5.x records ``output_hidden_states`` with forward hooks on the layer class; the hook sees the call
  of the wrapped layer itself (input and scattered output, both full length), so every recorded state has the full
  sequence length. 4.x collects them in the model's loop, also from the full-length layer outputs.
* Inputs are checked before any compute; unsupported setups raise (see ``_check_inputs``).

Per-token inputs are handled by the generic wrapper with the kept indices: ``attention_mask`` in every form the
models produce (None, 4-D bool or additive ``[b|1, 1, s, s]``, ``[b, 1, 1, s]``, 2-D flash-attention ``[b, s]``),
``position_ids`` and Llama's ``position_embeddings`` ``(cos, sin)``, each ``[b|1, s, d]`` (so rotary uses the kept
tokens' original positions). A ``None`` causal mask stays ``None``: queries and keys are the same ``k`` kept tokens,
sorted, so SDPA's and flash-attention's ``is_causal`` (top-left and bottom-right alignment coincide for a square
``k x k`` score matrix) is exactly the causal mask restricted to the kept tokens; the case where they differ (fewer
queries than keys, i.e. a filled KV cache) is rejected in training.
"""

from __future__ import annotations

import importlib
import inspect
import os
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import torch
from torch import nn

from random_ltd.config import RANDOM_LTD_PATH, ConfigError, ConfigIssue, RandomLTDConfig
from random_ltd.integrations.transformers._cache import CACHE_NAMES, cache_length
from random_ltd.layers import RandomLTDLayer, RandomLTDLayerOptions, RandomLTDState, convert_to_random_ltd
from random_ltd.layers.convert import find_layers
from random_ltd.layers.random_ltd_layer import layer_mixins, positional_indices, register_layer_mixin

__all__ = ["convert", "HFRandomLTDLayer", "SUPPORTED_LAYERS", "load_random_ltd_config"]

#: layer classes supported by name (plus any ``*DecoderLayer`` whose forward takes ``position_embeddings``)
SUPPORTED_LAYERS = ("GPT2Block", "BertLayer", "RobertaLayer", "ViTLayer", "LlamaDecoderLayer")

_VARLEN_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")


@dataclass
class HFLayerOptions(RandomLTDLayerOptions):
    """The generic options plus what the transformers checks need.

    Attributes:
        model_config: the model's ``PretrainedConfig`` (read at call time: the attention implementation can change).
        sliding_window: the layer's sliding window, if its attention has one (matters for flash-attention only).
        arg_positions: positions in ``forward``'s signature of the cache and cross-attention arguments.
        cache_layer_idx: the layer's index in a KV ``Cache`` (its attention's ``layer_idx``).
    """

    model_config: Any = None
    cache_layer_idx: int = 0
    sliding_window: int | None = None
    arg_positions: dict[str, int] = field(default_factory=dict, repr=False)


class HFRandomLTDLayer(RandomLTDLayer):
    """The generic random-LTD mixin, active only in a grad-enabled training forward, with transformers checks."""

    random_ltd_options: HFLayerOptions

    @classmethod
    def random_ltd_setup(cls, layer: nn.Module, options: RandomLTDLayerOptions) -> HFLayerOptions:
        """The generic options plus what the checks need, read off the layer (``convert`` then sets the model's
        config); transformers layers take ``[batch, seq, hidden]`` hidden states."""
        if not options.batch_first:
            raise ConfigError([ConfigIssue(f"{RANDOM_LTD_PATH}.hidden_state_order",
                                           f"'seq_batch_dim': transformers layers ({_base(layer).__name__}) take "
                                           "[batch, seq, hidden] hidden states; use 'batch_seq_dim'")])
        generic = {f.name: getattr(options, f.name) for f in fields(RandomLTDLayerOptions)}
        model_config = _layer_model_config(layer)
        return HFLayerOptions(**generic, model_config=model_config,
                              sliding_window=_sliding_window(layer, model_config),
                              arg_positions=positional_indices(layer, (*CACHE_NAMES, "encoder_hidden_states",
                                                                       "attention_mask")),
                              cache_layer_idx=_cache_layer_idx(layer, options.layer_id))

    def __call__(self, *args, **kwargs):
        # Decided here, outside the layer's gradient checkpoint: a reentrant checkpoint runs the first pass under
        # no_grad and replays forward() later, and both must take the same path.
        self._random_ltd_active = self.training and torch.is_grad_enabled()
        return super().__call__(*args, **kwargs)

    def forward(self, *args, **kwargs):
        if not getattr(self, "_random_ltd_active", False):
            return super(RandomLTDLayer, self).forward(*args, **kwargs)  # the original layer, untouched
        if self.random_ltd_state.enabled:
            _check_inputs(self, args, kwargs)
        return RandomLTDLayer.forward(self, *args, **kwargs)  # disabled: counted at full length, nothing dropped


def _get(layer: nn.Module, name: str, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
    """An argument of the layer call by name, passed by keyword or by position."""
    if name in kwargs:
        return kwargs[name]
    opts = layer.random_ltd_options
    pos = opts.arg_positions.get(name, opts._positional.get(name))
    return args[pos] if pos is not None and pos < len(args) else None


def _is_block_mask(mask: Any) -> bool:
    return type(mask).__name__ == "BlockMask"


def _check_inputs(layer: nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> None:
    """Raise for inputs random-LTD cannot slice correctly (called before any compute, training only)."""
    opts = layer.random_ltd_options
    where = f"random-LTD layer {opts.layer_id} ({_base(layer).__name__})"
    hidden = args[0] if args else kwargs.get(opts.hidden_name)
    if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
        return  # the generic wrapper reports it
    batch, seq_len = hidden.shape[0], hidden.shape[1]
    for name in CACHE_NAMES:
        filled = cache_length(_get(layer, name, args, kwargs), opts.cache_layer_idx)
        if filled:
            raise ValueError(f"{where}: {name} already holds {filled} tokens for this layer; random-LTD cannot drop "
                             "tokens on top of a filled KV cache in training (use eval mode, or use_cache=False)")
    for name in opts.mask_names:
        mask = _get(layer, name, args, kwargs)
        if _is_block_mask(mask):
            raise TypeError(f"{where}: {name} is a flex-attention BlockMask, which random-LTD cannot slice yet; load "
                            "the model with attn_implementation='sdpa' or 'eager' (or a flash-attention one)")
        if isinstance(mask, torch.Tensor) and mask.dim() == 4 and mask.shape[-2] not in (1, mask.shape[-1]):
            raise ValueError(f"{where}: {name} has {mask.shape[-2]} query rows and {mask.shape[-1]} key columns "
                             f"{list(mask.shape)}; random-LTD training needs queries == keys (no KV cache)")
        if isinstance(mask, torch.Tensor) and mask.shape[-1] != seq_len:
            raise ValueError(f"{where}: {name} covers {mask.shape[-1]} keys but the hidden states have {seq_len} "
                             f"tokens (mask {list(mask.shape)}); random-LTD training needs no KV cache")
    if _get(layer, "encoder_hidden_states", args, kwargs) is not None:
        raise NotImplementedError(f"{where}: cross-attention (encoder_hidden_states) is not supported by random-LTD "
                                  "yet; convert only self-attention stacks")
    varlen = [k for k in _VARLEN_KWARGS if kwargs.get(k) is not None]
    if varlen:
        raise ValueError(f"{where}: padding-free / packed batches ({', '.join(varlen)}) are not supported; pad the "
                         "batch and pass an attention_mask instead")
    pos_emb = kwargs.get("position_embeddings")
    if isinstance(pos_emb, dict):
        raise TypeError(f"{where}: position_embeddings given per layer type (dict {sorted(pos_emb)}) is not "
                        "supported; expected a (cos, sin) tuple of [b|1, s, d] tensors")
    impl = str(getattr(opts.model_config, "_attn_implementation", "") or "")
    if "flash" in impl:
        window = opts.sliding_window
        if window is not None and seq_len > window:
            raise NotImplementedError(f"{where}: {impl} applies sliding_window={window} to the kept tokens' "
                                      f"compacted indices, not their positions; use attn_implementation='sdpa' for "
                                      f"sequences longer than the window (got {seq_len})")
        pos = kwargs.get("position_ids")
        mask = _get(layer, "attention_mask", args, kwargs)
        if batch == 1 and mask is None and isinstance(pos, torch.Tensor) and pos.shape[-1] > 1 \
                and bool((pos.reshape(-1).diff() <= 0).any()):
            raise ValueError(f"{where}: packed sequences (position_ids restarting inside the row) are not supported "
                             f"with {impl}: the kept tokens' boundaries cannot be recovered; pad instead")


def _base(layer: nn.Module) -> type:
    """A layer's class before random-LTD wrapping."""
    return next(c for c in type(layer).__mro__ if not issubclass(c, RandomLTDLayer))


def _layer_model_config(layer: nn.Module) -> Any:
    """The ``PretrainedConfig`` a transformers layer's submodules keep (its attention does), or None."""
    for m in layer.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            return config
    return None


def _is_supported(cls: type) -> bool:
    if cls.__name__ in SUPPORTED_LAYERS:
        return True
    try:
        params = inspect.signature(cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return cls.__name__.endswith("DecoderLayer") and "position_embeddings" in params


def _cache_layer_idx(layer: nn.Module, default: int) -> int:
    for m in layer.modules():
        idx = getattr(m, "layer_idx", None)
        if isinstance(idx, int) and not isinstance(idx, bool):
            return idx
    return default


def _sliding_window(layer: nn.Module, model_config: Any) -> int | None:
    for m in layer.modules():
        window = getattr(m, "sliding_window", None)
        if isinstance(window, int) and not isinstance(window, bool):
            return window
    window = getattr(model_config, "sliding_window", None)
    return window if isinstance(window, int) and not isinstance(window, bool) else None


def load_random_ltd_config(config: RandomLTDConfig | dict | str | os.PathLike | None) -> RandomLTDConfig:
    """A ``RandomLTDConfig`` from itself, a whole DeepSpeed config (dict or JSON path), or the block alone (dict)."""
    if isinstance(config, RandomLTDConfig):
        return config
    if config is None:
        raise TypeError("config is required: a RandomLTDConfig, a DeepSpeed config dict or a path to its JSON file")
    if isinstance(config, (str, os.PathLike)):
        return RandomLTDConfig.from_deepspeed(config)
    if isinstance(config, dict):
        return RandomLTDConfig.from_deepspeed(config) if "data_efficiency" in config else \
            RandomLTDConfig.model_validate(config)
    raise TypeError(f"config must be a RandomLTDConfig, a dict or a path, got {type(config).__name__}")


def convert(
    model: nn.Module,
    config: RandomLTDConfig | dict | str | os.PathLike,
    *,
    layers: type | Sequence[nn.Module] | None = None,
    layer_ids: Sequence[int] | None = None,
    data_parallel_rank: int | None = None,
) -> RandomLTDState:
    """Wrap the random-LTD layers of a transformers model in place; return their shared ``RandomLTDState``.

    Args:
        model: a transformers ``PreTrainedModel`` (e.g. ``GPT2LMHeadModel``, ``BertForMaskedLM``,
            ``LlamaForCausalLM``, ``ViTForImageClassification``).
        config: a ``RandomLTDConfig``, a whole DeepSpeed config (dict, or path to its JSON file) holding
            ``data_efficiency.data_routing.random_ltd``, or that block alone as a dict. A disabled block wraps the
            layers (layer-token accounting still works) but nothing is dropped.
        layers: the transformer layers (class or modules); default: the longest ``nn.ModuleList`` of one class,
            which must be a supported class (``SUPPORTED_LAYERS`` or a Llama-style ``*DecoderLayer`` taking
            ``position_embeddings``). Passing ``layers`` explicitly skips that check: you vouch for the layer.
        layer_ids: override the config's ``random_ltd_layer_id`` (default: all but the first and last layer).
        data_parallel_rank: folded into the sampling seed (default: ``torch.distributed`` rank, else 0).

    Nothing is dropped until the state gets kept lengths: ``RandomLTDTrainer`` does that each optimizer step;
    by hand, ``state.advance(step, MSLGSchedule(cfg).layer_kept_lengths(step))``.

    Raises:
        ConfigError: ``hidden_state_order`` is ``seq_batch_dim`` (transformers layers are ``[b, s, h]``), or
            ``total_layer_num`` differs from the model.
        ValueError: the auto-detected layers are not a supported class.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    cfg = load_random_ltd_config(config)
    if cfg.hidden_state_order != "batch_seq_dim":
        raise ConfigError([ConfigIssue(f"{RANDOM_LTD_PATH}.hidden_state_order",
                                       f"{cfg.hidden_state_order!r}: transformers layers take [batch, seq, hidden] "
                                       "hidden states; use 'batch_seq_dim'")])
    found = find_layers(model, layers)
    if cfg.total_layer_num is not None and cfg.total_layer_num != len(found):
        raise ConfigError([ConfigIssue(f"{RANDOM_LTD_PATH}.total_layer_num",
                                       f"{cfg.total_layer_num} != {len(found)} layers found in "
                                       f"{type(model).__name__} (must equal the model's layer count)")])
    base = _base(found[0])
    if layers is None and not _is_supported(base):
        raise ValueError(f"layers: {base.__name__} is not a supported transformers layer (supported: "
                         f"{', '.join(SUPPORTED_LAYERS)} and Llama-style *DecoderLayer taking position_embeddings); "
                         "pass layers= explicitly to wrap it anyway")
    if not any(issubclass(base, b) for b, m in layer_mixins() if m is HFRandomLTDLayer):
        register_layer_mixin(base, HFRandomLTDLayer)  # passed explicitly as a transformers-style layer
    state = convert_to_random_ltd(model, found, cfg, layer_ids=layer_ids, data_parallel_rank=data_parallel_rank)
    state.enabled = cfg.enabled
    model_config = getattr(model, "config", None)
    for layer in found:
        if isinstance(layer, HFRandomLTDLayer) and model_config is not None:
            layer.random_ltd_options.model_config = model_config
            layer.random_ltd_options.sliding_window = _sliding_window(layer, model_config)
    return state


def _register_mixins() -> None:
    """Every transformers layer gets the HF-aware mixin, whichever entry point wraps it: the common base of 5.x
    layers (``GradientCheckpointingLayer``, also in late 4.x), and the supported classes of older releases."""
    try:
        from transformers.modeling_layers import GradientCheckpointingLayer
    except ImportError:
        pass
    else:
        register_layer_mixin(GradientCheckpointingLayer, HFRandomLTDLayer)
    for module, name in (("gpt2", "GPT2Block"), ("bert", "BertLayer"), ("roberta", "RobertaLayer"),
                         ("vit", "ViTLayer"), ("llama", "LlamaDecoderLayer")):
        try:
            cls = getattr(importlib.import_module(f"transformers.models.{module}.modeling_{module}"), name)
        except (ImportError, AttributeError):
            continue
        register_layer_mixin(cls, HFRandomLTDLayer)


_register_mixins()
