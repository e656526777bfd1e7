"""Wrap any transformer layer so that, in training, it runs on a random sorted subset of the tokens.

Wrapping changes the layer object's class in place to a subclass of both ``RandomLTDLayer`` and its own class. The
layer keeps its parameters, its state-dict keys, ``isinstance`` checks against its class (megatron-core's recompute
relies on them) and its place in the model; ``unwrap_random_ltd`` restores the original class.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from random_ltd.layers.state import RandomLTDState
from random_ltd.ops import gather_positions, slice_attention_mask, token_combine, token_drop

__all__ = ["RandomLTDLayer", "RandomLTDLayerOptions", "wrap_layer", "unwrap_random_ltd", "register_layer_mixin",
           "layer_mixins", "positional_indices", "DEFAULT_POSITION_NAMES"]

#: keyword names whose values are per-token positions (gathered with the kept indices)
DEFAULT_POSITION_NAMES = ("position_ids", "rotary_pos_emb", "position_embeddings", "cache_position")
#: keyword names whose values are attention/padding masks (sliced on both token axes)
DEFAULT_MASK_NAMES = ("attention_mask", "padding_mask")


@dataclass
class RandomLTDLayerOptions:
    """How a wrapped layer finds its inputs.

    Attributes:
        layer_id: global index of the layer (0-based); keys its indices and its kept length.
        batch_first: hidden states are ``[b, s, h]`` (DeepSpeed ``batch_seq_dim``) instead of ``[s, b, h]``.
        hidden_name: name of the hidden-states parameter when it is passed by keyword.
        mask_names: parameters holding masks, sliced with ``slice_attention_mask`` whether passed by keyword or by
            position (DeepSpeed's ``model_mask_name`` goes here).
        position_names: parameters holding positions or rotary tables, gathered with ``gather_positions``.
    """

    layer_id: int
    batch_first: bool = False
    hidden_name: str = "hidden_states"
    mask_names: tuple[str, ...] = DEFAULT_MASK_NAMES
    position_names: tuple[str, ...] = DEFAULT_POSITION_NAMES
    _positional: dict[str, int] = field(default_factory=dict, repr=False)


class RandomLTDLayer(nn.Module):
    """Mixin placed in front of a layer's class by ``wrap_layer``.

    Training forward: draw sorted indices ``[b, k]`` for this layer and micro-batch, gather the hidden states, slice
    the masks and gather the positions, run the original forward on ``k`` tokens, and scatter its output back into
    the full sequence: dropped tokens pass through unchanged. Gather and scatter are the fused ``token_drop`` /
    ``token_combine`` pair, whose backward writes the input gradient in one pass. In eval mode, or when ``k >= s``,
    the original forward runs untouched, so outputs are bitwise those of the unwrapped layer.
    """

    random_ltd_options: RandomLTDLayerOptions
    random_ltd_state: RandomLTDState

    @classmethod
    def check_supported(cls, layer: nn.Module) -> None:
        """Raise if ``layer`` is configured in a way this wrapper cannot handle (framework mixins override)."""

    @classmethod
    def random_ltd_setup(cls, layer: nn.Module, options: RandomLTDLayerOptions) -> RandomLTDLayerOptions:
        """The options the wrapped ``layer`` runs with: a framework mixin may check them or extend them with what
        it reads off the layer (``wrap_layer`` calls this before the class swap)."""
        return options

    def forward(self, *args, **kwargs):
        inner = super().forward
        opts = self.random_ltd_options
        if not self.training:
            return inner(*args, **kwargs)
        args = list(args)
        hidden = args[0] if args else kwargs[opts.hidden_name]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"random-LTD layer {opts.layer_id}: hidden states must be a 3-D tensor "
                             f"({'[b, s, h]' if opts.batch_first else '[s, b, h]'}), got {type(hidden).__name__}"
                             f"{list(hidden.shape) if isinstance(hidden, torch.Tensor) else ''}")
        batch, seq_len = (hidden.shape[0], hidden.shape[1]) if opts.batch_first else (hidden.shape[1], hidden.shape[0])
        idx = kept_indices(self.random_ltd_state, opts.layer_id, batch, seq_len, hidden.device)
        if idx is None:
            return inner(*args, **kwargs)
        # Fused pair: the backward writes hidden's gradient in one pass (random_ltd/ops/fused.py).
        kept, dropped = token_drop(hidden, idx, batch_first=opts.batch_first, check_indices=False)
        if args:
            args[0] = kept
        else:
            kwargs[opts.hidden_name] = kept
        for names, fn in ((opts.mask_names, slice_attention_mask), (opts.position_names, gather_positions)):
            for name in names:
                if name in kwargs:
                    _check_token_axis(opts.layer_id, name, kwargs[name], seq_len, fn is slice_attention_mask)
                    kwargs[name] = fn(kwargs[name], idx)
                elif name in opts._positional and opts._positional[name] < len(args):
                    pos = opts._positional[name]
                    _check_token_axis(opts.layer_id, name, args[pos], seq_len, fn is slice_attention_mask)
                    args[pos] = fn(args[pos], idx)

        out = inner(*args, **kwargs)
        first = out if isinstance(out, torch.Tensor) else out[0]
        # Under autocast a layer may return another dtype; the result then has the layer's dtype, as unwrapped.
        full = token_combine(dropped, first)
        if isinstance(out, torch.Tensor):
            return full
        return type(out)((full, *out[1:])) if isinstance(out, tuple) else [full, *out[1:]]


def _check_token_axis(layer_id: int, name: str, value, seq_len: int, is_mask: bool) -> None:
    """A mask or position tensor must cover exactly the layer's ``seq_len`` tokens before it is sliced.

    The slicing ops can only check the indices against the tensor's own length; a mask or rotary table of another
    length than the hidden states (a stale or padded one) would be sliced without error into the wrong tokens'
    entries. Masks: the key axis (last) is ``s``, and a 4-D mask's query axis is ``s`` or 1. Positions: the
    sequence axis (``[s]``, ``[s, 1, 1, d]``: first; ``[b, s]``, ``[b, s, d]``: second), for each tensor of a tuple.
    """
    if isinstance(value, (tuple, list)) and not is_mask:
        for v in value:
            _check_token_axis(layer_id, name, v, seq_len, is_mask)
        return
    if not isinstance(value, torch.Tensor) or value.dim() == 0:
        return  # None passes through; other forms get the op's own error
    if is_mask:
        axes = [value.dim() - 1] + ([2] if value.dim() == 4 and value.shape[2] != 1 else [])
        form = "[b, s], [b, 1, 1, s] or [b, h, s, s]"
    else:
        axes = [0 if value.dim() in (1, 4) else 1]
        form = "[s], [b, s], [b, s, d] or [s, 1, 1, d]"
    for axis in axes:
        if value.shape[axis] != seq_len:
            raise ValueError(f"random-LTD layer {layer_id}: {name} has shape {list(value.shape)}, but the hidden "
                             f"states have {seq_len} tokens; expected {form} with s = {seq_len}")


@torch.compiler.disable
def kept_indices(state: RandomLTDState, layer_id: int, batch: int, seq_len: int,
                 device: torch.device) -> torch.Tensor | None:
    """One wrapped-layer call's bookkeeping: kept length, layer-token record, sorted kept indices (None: keep all).

    Run eagerly even under ``torch.compile``: compiled, the step and the kept length would be guarded constants, so
    every optimizer step and every new MSLG length would recompile. Eager, a graph sees only ``idx``, whose length
    dynamo makes a dynamic dimension after the second size (a bounded number of recompiles over a whole schedule).
    """
    keep = state.kept_length(layer_id, seq_len)
    state.record(layer_id, batch, seq_len, keep)
    if keep >= seq_len:
        return None
    return state.indices(layer_id, batch, seq_len, keep, device)


def positional_indices(layer: nn.Module, names: Iterable[str]) -> dict[str, int]:
    """Position of each named parameter in ``forward``'s signature, to find masks passed positionally."""
    try:
        params = list(inspect.signature(type(layer).forward).parameters.values())[1:]  # drop self
    except (TypeError, ValueError):
        return {}
    out = {}
    for i, p in enumerate(params):
        if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name in names:
            out[p.name] = i
    return out


_CLASS_CACHE: dict[type, type] = {}
#: (layer base class, RandomLTDLayer subclass) pairs registered by framework adapters, most specific first
_MIXINS: list[tuple[type, type]] = []


def register_layer_mixin(base: type, mixin: type) -> None:
    """Use ``mixin`` (a ``RandomLTDLayer`` subclass) instead of the generic one for layers derived from ``base``.

    Framework adapters register here (e.g. megatron-core's ``TransformerLayer``), so that ``wrap_layer`` and
    ``convert_to_random_ltd`` apply the framework-aware forward to any layer of that framework.
    """
    if not (isinstance(mixin, type) and issubclass(mixin, RandomLTDLayer)):
        raise TypeError(f"mixin must be a RandomLTDLayer subclass, got {mixin!r}")
    if any(b is base for b, _ in _MIXINS):
        return
    _MIXINS.append((base, mixin))
    _MIXINS.sort(key=lambda bm: -len(bm[0].__mro__))  # most derived base first


#: module prefix of a framework's layers -> the adapter module that registers its mixin on import
_ADAPTERS = {"transformers.": "random_ltd.integrations.transformers.convert",
             "megatron.core.": "random_ltd.integrations.megatron.layer"}


def _import_adapter(cls: type) -> None:
    """Import the adapter of the framework ``cls`` comes from, so its mixin is registered whichever entry point
    (``random_ltd.initialize``, ``convert_to_random_ltd`` or the adapter's own ``convert``) wraps the layer."""
    for prefix, module in _ADAPTERS.items():
        if any(c.__module__.startswith(prefix) for c in cls.__mro__):
            importlib.import_module(module)


def layer_mixins() -> list[tuple[type, type]]:
    """The registered ``(layer base class, mixin)`` pairs, most specific first."""
    return list(_MIXINS)


def _wrapped_class(cls: type) -> type:
    if issubclass(cls, RandomLTDLayer):
        return cls
    if cls not in _CLASS_CACHE:
        _import_adapter(cls)
        mixin = next((m for b, m in _MIXINS if issubclass(cls, b)), RandomLTDLayer)
        # Defined at module level through a cache so that every wrapped GPT2Block shares one class.
        _CLASS_CACHE[cls] = type(f"RandomLTD{cls.__name__}", (mixin, cls), {"__module__": cls.__module__})
    return _CLASS_CACHE[cls]


def wrap_layer(layer: nn.Module, state: RandomLTDState, options: RandomLTDLayerOptions) -> nn.Module:
    """Turn ``layer`` (in place) into a random-LTD layer sharing ``state``; returns the same object."""
    if not isinstance(layer, nn.Module):
        raise TypeError(f"layer must be an nn.Module, got {type(layer).__name__}")
    options._positional = positional_indices(layer, (*options.mask_names, *options.position_names))
    cls = _wrapped_class(type(layer))
    cls.check_supported(layer)
    options = cls.random_ltd_setup(layer, options)
    layer.__class__ = cls
    layer.random_ltd_options = options
    layer.random_ltd_state = state
    return layer


def unwrap_random_ltd(layers: Sequence[nn.Module] | nn.Module) -> None:
    """Restore the original classes of wrapped layers (the modules in ``layers``, or every one under a model)."""
    modules = layers.modules() if isinstance(layers, nn.Module) else layers
    for m in list(modules):
        if isinstance(m, RandomLTDLayer):
            m.__class__ = next(c for c in type(m).__mro__ if not issubclass(c, RandomLTDLayer))
            m.__dict__.pop("random_ltd_options", None)
            m.__dict__.pop("random_ltd_state", None)
