"""random-LTD for megatron-core ``TransformerLayer``: a forward override that gathers, runs and scatters back.

``RandomLTDTransformerLayer`` is a ``TransformerLayer`` subclass (recompute and state-dict code see a
``TransformerLayer``; parameter names are unchanged) whose training forward runs the layer on the kept tokens only.
It is inserted by the ModuleSpecs of ``random_ltd.integrations.megatron.specs``, or produced in place by
``convert_to_random_ltd`` / ``random_ltd.initialize`` from any megatron-core ``TransformerLayer`` (the
``register_layer_mixin`` hook).

megatron-core specifics handled here:
- hidden states ``[s, b, h]``; under sequence parallelism ``[s/tp, b, h]`` (stratified picks, see below);
- ``attention_mask`` (``[b|1, 1, s, s]`` bool, padding or EOD-reset) and ``attention_bias`` sliced on both token
  axes, ``padding_mask`` ``[b, s]`` sliced; ``None`` with a causal mask type needs nothing (for sorted indices the
  sliced causal mask is the fresh ``k x k`` causal mask megatron builds);
- ``rotary_pos_emb`` ``[s, 1, 1, d]`` (or a ``(q, k)`` pair) gathered per sample to ``[k, b, 1, d]``; with fused
  RoPE (``apply_rope_fusion``), which only takes ``[k, 1, 1, d]``, indices are shared by the batch;
- tensor parallelism: indices come from the counter key (seed, step, micro-batch, layer) with the *data-parallel*
  rank folded into the seed, so all tensor-parallel ranks (and full recompute) draw the same ones;
- sequence parallelism: the kept length must divide by tp; each rank keeps ``k/tp`` positions of its own shard
  (``RandomLTDState.sharded_indices``), and masks/rotary rows are sliced with the global positions every rank can
  compute; no extra communication;
- ``torch.compile``: the per-call bookkeeping (kept length, layer-token record, index draws) runs eagerly in
  ``megatron_kept_indices``, so a compiled model does not recompile at every step or new MSLG kept length.

Refused with an error: context parallelism > 1, packed (THD) sequences, CUDA graphs, multi-latent attention,
pipeline parallelism > 1 (layer ids would be stage-local), and inference contexts are never dropped.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer

from random_ltd.layers.random_ltd_layer import RandomLTDLayer, register_layer_mixin
from random_ltd.layers.state import RandomLTDState
from random_ltd.ops import gather_positions, slice_attention_mask, token_combine, token_drop

__all__ = ["RandomLTDMegatronLayer", "RandomLTDTransformerLayer", "megatron_kept_indices", "unsupported_reasons"]

_FORWARD_NAMES = ("hidden_states", "attention_mask", "context", "context_mask", "rotary_pos_emb", "rotary_pos_cos",
                  "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias", "inference_context", "packed_seq_params",
                  "sequence_len_offset", "padding_mask")


def unsupported_reasons(config: Any) -> list[str]:
    """Why random-LTD cannot run on a megatron-core ``TransformerConfig`` (empty when it can)."""
    reasons = []
    if getattr(config, "context_parallel_size", 1) > 1:
        reasons.append(f"context_parallel_size={config.context_parallel_size}: each rank holds a slice of the "
                       "sequence in a load-balanced order, which random-LTD's sorted sampling does not model; use 1")
    if getattr(config, "multi_latent_attention", False):
        reasons.append("multi_latent_attention=True: MLA computes its own RoPE from the reduced length "
                       "(kept tokens would get positions 0..k-1)")
    if getattr(config, "cuda_graph_impl", "none") != "none" or getattr(config, "enable_cuda_graph", False) \
            or getattr(config, "external_cuda_graph", False):
        reasons.append(f"CUDA graphs (cuda_graph_impl={getattr(config, 'cuda_graph_impl', None)!r}): the kept length "
                       "changes during training, so captured shapes would be replayed wrongly")
    if getattr(config, "pipeline_model_parallel_size", 1) > 1:
        reasons.append(f"pipeline_model_parallel_size={config.pipeline_model_parallel_size}: not supported yet "
                       "(layer ids and layer-token accounting are per stage)")
    return reasons


class RandomLTDMegatronLayer(RandomLTDLayer):
    """Mixin placed in front of megatron-core ``TransformerLayer`` classes (see the module docstring)."""

    @classmethod
    def check_supported(cls, layer: torch.nn.Module) -> None:
        reasons = unsupported_reasons(layer.config)
        if reasons:
            raise NotImplementedError(f"random-LTD layer {layer.layer_number - 1}: " + "; ".join(reasons))

    def _framework_forward(self, **kwargs):
        return super(RandomLTDLayer, self).forward(**kwargs)

    def forward(self, *args, **kwargs):
        if args:  # megatron passes everything by keyword; accept positional use for direct calls
            kwargs.update(zip(_FORWARD_NAMES, args))
        state = self.__dict__.get("random_ltd_state")
        if not self.training or kwargs.get("inference_context") is not None:
            return self._framework_forward(**kwargs)
        if state is None:
            raise RuntimeError(f"random-LTD layer {self.layer_number - 1} has no random-LTD state: after building the "
                               "model call random_ltd.initialize(...) or convert_to_random_ltd(model, config=...)")
        opts = self.random_ltd_options
        if opts.layer_id != self.layer_number - 1:
            raise RuntimeError(f"random-LTD layer id {opts.layer_id} != megatron layer_number - 1 = "
                               f"{self.layer_number - 1}; pass the decoder's layers in order")
        if kwargs.get("packed_seq_params") is not None:
            raise NotImplementedError("random-LTD does not support packed (THD) sequences (packed_seq_params)")
        if kwargs.get("context") is not None:
            raise NotImplementedError("random-LTD does not support cross-attention layers (context is not None)")
        for name in ("rotary_pos_cos", "rotary_pos_sin", "rotary_pos_cos_sin"):
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"random-LTD does not support {name} in training (an inference path)")

        hidden = kwargs["hidden_states"]
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 3:
            raise ValueError(f"random-LTD layer {opts.layer_id}: hidden_states must be a [s, b, h] tensor")
        shard_len, batch = hidden.shape[0], hidden.shape[1]
        tp = self.config.tensor_model_parallel_size if self.config.sequence_parallel else 1
        rows = 1 if self.config.apply_rope_fusion else batch  # fused RoPE takes [k, 1, 1, d] only
        picked = megatron_kept_indices(state, opts.layer_id, batch, shard_len, tp,
                                       self.tp_group if tp > 1 else None, rows, hidden.device)
        if picked is None:
            return self._framework_forward(**kwargs)
        local, global_idx = picked
        local = local.expand(batch, -1)

        # Fused pair: the backward writes hidden's gradient in one pass (random_ltd/ops/fused.py).
        kwargs["hidden_states"], dropped = token_drop(hidden, local, batch_first=False, check_indices=False)
        for name in ("attention_mask", "attention_bias", "padding_mask"):
            if kwargs.get(name) is not None:
                kwargs[name] = slice_attention_mask(kwargs[name], global_idx)
        if kwargs.get("rotary_pos_emb") is not None:
            kwargs["rotary_pos_emb"] = gather_positions(kwargs["rotary_pos_emb"], global_idx)

        out, context = self._framework_forward(**kwargs)
        full = token_combine(dropped, out)
        return full, context


@torch.compiler.disable
def megatron_kept_indices(state: RandomLTDState, layer_id: int, batch: int, shard_len: int, tp: int,
                          tp_group: Any, rows: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One megatron layer call's bookkeeping: kept length, layer-token record and the kept indices.

    Returns ``(local, global_idx)``: ``local`` ``[rows, k/tp]`` positions in this rank's shard of ``shard_len``
    tokens, ``global_idx`` ``[rows, k]`` positions in the full sequence (the same tensor when ``tp == 1``), or
    ``None`` when the layer keeps every token. ``tp`` is the sequence-parallel size (1 without sequence parallelism;
    ``tp_group`` is then unused) and ``rows`` is 1 under fused RoPE (indices shared by the batch).

    Run eagerly even under ``torch.compile``, as ``random_ltd.layers.random_ltd_layer.kept_indices``: compiled, the
    step and the kept length would be guarded constants, so every optimizer step and every new MSLG length would
    recompile.
    """
    seq_len = shard_len * tp
    keep = state.kept_length(layer_id, seq_len)
    state.record(layer_id, batch, seq_len, keep)
    if keep >= seq_len:
        return None
    if tp > 1:
        if keep % tp:
            raise ValueError(f"random-LTD layer {layer_id}: kept length {keep} must be divisible by the "
                             f"tensor-parallel size {tp} under sequence parallelism (set min_value and "
                             "seq_per_step to multiples of tp)")
        picks = state.sharded_indices(layer_id, rows, shard_len, keep // tp, tp, device)
        local = picks[tp_group.rank()]
        offsets = torch.arange(tp, device=device).mul_(shard_len).view(tp, 1, 1)
        return local, (picks + offsets).permute(1, 0, 2).reshape(rows, keep)
    local = state.indices(layer_id, rows, seq_len, keep, device)
    return local, local


class RandomLTDTransformerLayer(RandomLTDMegatronLayer, TransformerLayer):
    """megatron-core ``TransformerLayer`` with random-LTD; use it as the ``module`` of a layer ``ModuleSpec``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        TransformerLayer.__init__(self, *args, **kwargs)
        self.check_supported(self)


register_layer_mixin(TransformerLayer, RandomLTDMegatronLayer)
