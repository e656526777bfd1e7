"""``convert_to_random_ltd``: find a model's transformer layers by object and index, and wrap the middle ones."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, get_args

from torch import nn

from random_ltd.layers.random_ltd_layer import (
    DEFAULT_MASK_NAMES,
    RandomLTDLayer,
    RandomLTDLayerOptions,
    wrap_layer,
)
from random_ltd.layers.state import RandomLTDState

if TYPE_CHECKING:
    from random_ltd.config import RandomLTDConfig
    from random_ltd.config.random_ltd import HiddenStateOrder

__all__ = ["convert_to_random_ltd", "find_layers", "get_random_ltd_state"]

LayerSpec = type | tuple[type, ...] | Sequence[nn.Module] | nn.ModuleList | None


def _wrapper_types() -> tuple[type, ...]:
    from torch.nn.parallel import DistributedDataParallel

    types: tuple[type, ...] = (DistributedDataParallel,)
    try:
        from deepspeed.runtime.engine import DeepSpeedEngine
    except ImportError:
        return types
    return (*types, DeepSpeedEngine)


def _unwrap_engine(model: Any) -> nn.Module:
    """A DeepSpeed engine (or DDP) holds the user's model in ``.module``; that model is what we convert."""
    wrappers = _wrapper_types()
    while isinstance(model, wrappers):
        model = model.module
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module or a DeepSpeed engine, got {type(model).__name__}")
    return model


def _base_class(module: nn.Module) -> type:
    """A module's class before random-LTD wrapping."""
    return next(c for c in type(module).__mro__ if not issubclass(c, RandomLTDLayer))


_CONTAINERS = (nn.Sequential, nn.ModuleList, nn.ModuleDict)


def _is_block(module: nn.Module) -> bool:
    """A module that can be a transformer layer: has submodules and is not a generic container."""
    return not isinstance(module, _CONTAINERS) and next(module.children(), None) is not None


def _runs(container: nn.Module) -> list[list[nn.Module]]:
    """Maximal runs (length >= 2) of consecutive children of one block class (see ``_is_block``).

    An ``nn.ModuleList`` counts only whole (all children of one class, any class): a part of a mixed list (e.g.
    alternating attention and state-space layers) is not "the transformer layers", so it must be named explicitly.
    """
    if isinstance(container, nn.ModuleList):
        children = list(container)
        whole = len(children) >= 2 and len({_base_class(c) for c in children}) == 1
        return [children] if whole else []
    runs: list[list[nn.Module]] = []
    run: list[nn.Module] = []
    for child in container.children():
        if run and _base_class(child) is _base_class(run[0]):
            run.append(child)
            continue
        if len(run) >= 2:
            runs.append(run)
        run = [child] if _is_block(child) else []
    if len(run) >= 2:
        runs.append(run)
    return runs


def find_layers(model: nn.Module, layers: LayerSpec = None) -> list[nn.Module]:
    """The ordered transformer layers of ``model``.

    ``layers`` may be a layer class (or tuple of classes): every instance in module order; an explicit sequence of
    modules; or None: the longest run of consecutive same-class blocks among the children of any container: an
    ``nn.ModuleList`` of one class (``h``, ``layers``, ...), or in an ``nn.Sequential`` (timm/ViT ``blocks``) or any
    other module a run of modules that have submodules and are not generic containers (so an MLP's ``Linear``
    layers never count). Only outermost runs count, not repeats inside a layer (LoRA-wrapped projections, MoE
    experts). Two longest runs of equal length are ambiguous: the error names them.
    """
    if isinstance(layers, type) or (isinstance(layers, tuple) and layers and all(isinstance(c, type) for c in layers)):
        found = [m for m in model.modules() if isinstance(m, layers)]
        if not found:
            names = layers.__name__ if isinstance(layers, type) else [c.__name__ for c in layers]
            raise ValueError(f"layers: no module of class {names} in {type(model).__name__}")
        return found
    if layers is not None:
        found = list(layers)
        if not all(isinstance(m, nn.Module) for m in found):
            raise TypeError("layers must be a layer class, a tuple of classes, or a sequence of nn.Module layers")
        return found
    names = {id(m): name for name, m in model.named_modules()}
    runs = [run for m in model.modules() for run in _runs(m)]
    # outermost runs only: repeated parts inside a layer (LoRA-wrapped projections, MoE experts) are not the layers
    inner = {id(sub) for run in runs for layer in run for sub in layer.modules() if sub is not layer}
    candidates = [run for run in runs if id(run[0]) not in inner]
    if not candidates:
        raise ValueError(f"layers: could not find the transformer layers of {type(model).__name__} (no container "
                         "holds two or more consecutive blocks of one class); pass the layer class or the layers")
    longest = max(len(run) for run in candidates)
    best = [run for run in candidates if len(run) == longest]
    if len(best) > 1:
        listed = "; ".join(f"{len(run)} x {_base_class(run[0]).__name__} at "
                           f"{names[id(run[0])] or '<root>'}..{names[id(run[-1])]}" for run in best)
        raise ValueError(f"layers: the transformer layers of {type(model).__name__} are ambiguous, candidates: "
                         f"{listed}; pass the layer class or the layers (layers=...)")
    return best[0]


def get_random_ltd_state(model: Any) -> RandomLTDState | None:
    """The state shared by the wrapped layers of ``model`` (None if nothing is wrapped)."""
    for m in _unwrap_engine(model).modules():
        state = getattr(m, "random_ltd_state", None) if isinstance(m, RandomLTDLayer) else None
        if state is not None:
            return state
    return None


def _micro_batch_hook(state: RandomLTDState):
    def hook(module: nn.Module, args: Any) -> None:
        if module.training:
            state.begin_micro_batch()

    return hook


def _new_state(root: nn.Module, config: RandomLTDConfig, data_parallel_rank: int, total: int) -> RandomLTDState:
    """A RandomLTDState, or for ``token_bypass`` a TokenBypassState fed the model's token ids by a pre-hook."""
    if not config.token_bypass.enabled:
        return RandomLTDState(seed=config.seed, data_parallel_rank=data_parallel_rank, total_layers=total)
    from random_ltd.layers.token_bypass import TokenBypassState

    bypass = config.token_bypass
    state = TokenBypassState(seed=config.seed, data_parallel_rank=data_parallel_rank, total_layers=total,
                             moving_average=bypass.moving_average, special_token_ids=tuple(bypass.special_token_ids),
                             input_ids_name=bypass.input_ids_name)
    root.register_forward_pre_hook(state.input_ids_hook(), with_kwargs=True)
    return state


def convert_to_random_ltd(
    model: Any,
    layers: LayerSpec = None,
    config: RandomLTDConfig | dict | str | os.PathLike | None = None,
    *,
    hidden_state_order: HiddenStateOrder | None = None,
    layer_ids: Sequence[int] | None = None,
    data_parallel_rank: int | None = None,
) -> RandomLTDState:
    """Wrap the random-LTD layers of ``model`` in place and return their shared ``RandomLTDState``.

    Works on a plain model before or after ``deepspeed.initialize`` (an engine is unwrapped to its module) and after
    a checkpoint load; state-dict keys do not change. Layers are identified by object and index, never by name.

    Args:
        model: the model, or a DeepSpeed engine holding it.
        layers: which modules are the transformer layers (see ``find_layers``); default: auto-detected.
        config: a ``RandomLTDConfig``, a DeepSpeed config (dict or JSON path) with the random-LTD block, or the
            block alone (dict); default: the paper's defaults (every layer but the first and the last) with the
            ``hidden_state_order`` given here.
        hidden_state_order: layout of the layers' hidden states: ``"seq_batch_dim"`` (``[s, b, h]``, Megatron) or
            ``"batch_seq_dim"`` (``[b, s, h]``, HF). Required when ``config`` is None: a wrong layout would drop
            batch rows instead of tokens without any error, so there is no silent default. With a ``config`` it
            may be given to restate the config's ``hidden_state_order``, and must then agree with it.
        layer_ids: override which layer indices are wrapped.
        data_parallel_rank: folded into the seed so that data-parallel replicas drop different tokens
            (default: ``torch.distributed`` rank when initialised, else 0).

    Raises:
        ValueError: layer ids out of range, a config whose ``total_layer_num`` disagrees with the model, or
            ``hidden_state_order`` missing (no config), not one of the two layouts, or disagreeing with the config.
    """
    from random_ltd.config import RandomLTDConfig
    from random_ltd.config.random_ltd import HiddenStateOrder

    root = _unwrap_engine(model)
    if hidden_state_order is not None and hidden_state_order not in get_args(HiddenStateOrder):
        raise ValueError(f"hidden_state_order: expected one of {get_args(HiddenStateOrder)}, got "
                         f"{hidden_state_order!r}")
    if config is None:
        if hidden_state_order is None:
            raise ValueError("hidden_state_order is required when no config is given: 'seq_batch_dim' for [s, b, h] "
                             "hidden states (Megatron) or 'batch_seq_dim' for [b, s, h] (HF); a wrong layout would "
                             "drop batch rows instead of tokens")
        config = RandomLTDConfig(hidden_state_order=hidden_state_order)
    elif isinstance(config, (str, os.PathLike)):
        config = RandomLTDConfig.from_deepspeed(config)  # a DeepSpeed JSON config file
    elif isinstance(config, dict):
        config = RandomLTDConfig.from_deepspeed(config) if "data_efficiency" in config else \
            RandomLTDConfig.model_validate(config)
    if hidden_state_order is not None and hidden_state_order != config.hidden_state_order:
        raise ValueError(f"hidden_state_order: {hidden_state_order!r} disagrees with the config's "
                         f"data_efficiency.data_routing.random_ltd.hidden_state_order {config.hidden_state_order!r}")
    found = find_layers(root, layers)
    total = len(found)
    if config.total_layer_num is not None and config.total_layer_num != total:
        raise ValueError(f"data_efficiency.data_routing.random_ltd.total_layer_num: {config.total_layer_num} != "
                         f"{total} layers found in {type(root).__name__}")
    if layer_ids is None:
        layer_ids = config.random_ltd_layer_id if config.random_ltd_layer_id else range(1, total - 1)
    ids = sorted(set(layer_ids))
    bad = [i for i in ids if not 0 <= i < total]
    if bad:
        raise ValueError(f"layer_ids: {bad} out of range [0, {total})")

    state = get_random_ltd_state(root)
    if state is None:
        if data_parallel_rank is None:
            import torch.distributed as dist

            data_parallel_rank = dist.get_rank() if dist.is_available() and dist.is_initialized() else 0
        state = _new_state(root, config, data_parallel_rank, total)
        root.register_forward_pre_hook(_micro_batch_hook(state))
    elif data_parallel_rank is not None:
        state.data_parallel_rank = data_parallel_rank
    mask_names = tuple(dict.fromkeys(((config.model_mask_name,) if config.model_mask_name else ()) +
                                     DEFAULT_MASK_NAMES))
    # Layers built as random-LTD layers (e.g. megatron-core's one BERT spec for all layers) but outside ``ids`` get
    # the state too: they then run at full length, as the schedule never gives them a kept length.
    prebuilt = [i for i, m in enumerate(found) if isinstance(m, RandomLTDLayer) and i not in ids]
    for i in sorted({*ids, *prebuilt}):
        opts = RandomLTDLayerOptions(layer_id=i, batch_first=config.hidden_state_order == "batch_seq_dim",
                                     mask_names=mask_names)
        wrap_layer(found[i], state, opts)
    return state
