"""ModuleSpecs that put ``RandomLTDTransformerLayer`` into megatron-core GPT and BERT models.

GPT takes per-layer specs: the random-LTD layers (``random_ltd_layer_id``, by default every layer but the first and
the last) get ``RandomLTDTransformerLayer``, the others the base spec unchanged. ``BertModel`` accepts one spec for
all layers, so every BERT layer is a ``RandomLTDTransformerLayer`` and the ones outside ``random_ltd_layer_id``
never drop (the ids attached by ``random_ltd.initialize`` / ``convert_to_random_ltd`` decide, by the global
``layer_number``). Parameter names are those of the base spec, so checkpoints load either way.
"""

from __future__ import annotations

import dataclasses

from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from random_ltd.config import RandomLTDConfig
from random_ltd.integrations.megatron.layer import RandomLTDTransformerLayer

__all__ = ["gpt_layer_specs", "bert_layer_spec", "random_ltd_layer_ids"]


def random_ltd_layer_ids(num_layers: int, config: RandomLTDConfig | dict | None = None) -> tuple[int, ...]:
    """0-based ids of the random-LTD layers of an ``num_layers``-layer model under ``config``.

    Raises:
        ValueError: ``total_layer_num`` differs from ``num_layers``, or an id is out of range.
    """
    if not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if config is None:
        config = RandomLTDConfig()
    elif isinstance(config, dict):
        config = RandomLTDConfig.from_deepspeed(config) if "data_efficiency" in config else \
            RandomLTDConfig.model_validate(config)
    if config.total_layer_num is not None and config.total_layer_num != num_layers:
        raise ValueError(f"data_efficiency.data_routing.random_ltd.total_layer_num: {config.total_layer_num} != "
                         f"num_layers {num_layers}")
    ids = tuple(config.random_ltd_layer_id) if config.random_ltd_layer_id else tuple(range(1, num_layers - 1))
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"data_efficiency.data_routing.random_ltd.random_ltd_layer_id: {bad} out of range "
                         f"[0, {num_layers})")
    return ids


def _local_norm() -> type:
    from megatron.core.models.gpt import gpt_layer_specs

    return gpt_layer_specs.LNImpl


def _layer_spec(base_spec: ModuleSpec) -> ModuleSpec:
    if not isinstance(base_spec, ModuleSpec):
        raise TypeError(f"base_spec must be a megatron ModuleSpec for one layer, got {type(base_spec).__name__}")
    return dataclasses.replace(base_spec, module=RandomLTDTransformerLayer)


def gpt_layer_specs(
    num_layers: int,
    random_ltd_config: RandomLTDConfig | dict | None = None,
    *,
    base_spec: ModuleSpec | None = None,
    use_transformer_engine: bool = False,
    layer_norm: type | ModuleSpec | None = None,
) -> TransformerBlockSubmodules:
    """Decoder block spec for ``GPTModel(transformer_layer_spec=...)`` with random-LTD middle layers.

    Args:
        num_layers: the model's layer count (``TransformerConfig.num_layers``).
        random_ltd_config: which layers are random-LTD layers (a ``RandomLTDConfig`` or a DeepSpeed config dict);
            default: all but the first and the last.
        base_spec: the layer spec to start from; default: ``get_gpt_layer_local_spec()``, or
            ``get_gpt_layer_with_transformer_engine_spec()`` with ``use_transformer_engine``.
        use_transformer_engine: pick the Transformer Engine base spec and final norm (TE must be installed).
        layer_norm: the final norm of the block; default: megatron's (``TENorm``, or the local ``LNImpl``).

    Raises:
        ValueError: a config that disagrees with ``num_layers``. ImportError: TE requested but not installed.
    """
    from megatron.core.models.gpt import gpt_layer_specs as mspecs

    ids = set(random_ltd_layer_ids(num_layers, random_ltd_config))
    if use_transformer_engine:
        if mspecs.TENorm is None:
            raise ImportError("use_transformer_engine=True but Transformer Engine is not installed")
        base_spec = base_spec or mspecs.get_gpt_layer_with_transformer_engine_spec()
        norm = mspecs.TENorm
    else:
        base_spec = base_spec or mspecs.get_gpt_layer_local_spec()
        norm = _local_norm()
    ltd_spec = _layer_spec(base_spec)
    return TransformerBlockSubmodules(layer_specs=[ltd_spec if i in ids else base_spec for i in range(num_layers)],
                                      layer_norm=layer_norm or norm)


def bert_layer_spec(base_spec: ModuleSpec | None = None, *, use_transformer_engine: bool = False) -> ModuleSpec:
    """One layer spec for ``BertModel(transformer_layer_spec=...)``: every layer a ``RandomLTDTransformerLayer``.

    Which layers drop is decided when random-LTD is attached (``random_ltd_layer_id``, by global layer number).
    """
    if base_spec is None:
        from megatron.core.models.bert import bert_layer_specs as bspecs

        base_spec = bspecs.get_bert_layer_with_transformer_engine_spec() if use_transformer_engine \
            else bspecs.bert_layer_local_spec
    return _layer_spec(base_spec)
