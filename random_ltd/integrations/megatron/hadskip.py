"""HadSkip for megatron-core BERT: per-sequence layer gates on the encoder layers of a ``BertModel``.

``convert_bert_to_hadskip(model, config)`` replaces each encoder layer by a ``MegatronHadSkipLayer``: the
``HadSkipLayer`` of ``random_ltd.layers.hadskip`` (gate FFN, ReinMax/STE/Gumbel, masked combination in training, real
skipping in eval) that calls the megatron ``TransformerLayer`` in megatron's convention (``[s, b, h]``, keyword
arguments, ``(output, context)``). The gate pools over the real tokens, read from BERT's padding mask (``[b, 1, s, s]``
or ``[b, 1, 1, s]``, True = masked). In real-skip mode the mask rows of the kept sequences go with them. Parameter
names gain ``.layer`` (``encoder.layers.<i>.layer.*``) plus the gate's ``encoder.layers.<i>.gate.*``.

The budget penalty, the homotopic schedule and the gate statistics (``budget_penalty``, ``collect_gates``,
``HomotopicBudget``) work on these layers as on the Hugging Face ones. The three-stage trainer with distillation
(``random_ltd.hadskip_trainer``) is written for the Hugging Face adapter (it reads attention maps from eager HF
attention) and does not drive megatron models yet.

Refused with an error: tensor/sequence/context/pipeline parallelism > 1 (gate decisions per rank are not coordinated
yet), full recompute (megatron recomputes only ``TransformerLayer`` instances), packed sequences, inference contexts.
"""

from __future__ import annotations

from typing import Any

import torch
from megatron.core.transformer.transformer_layer import TransformerLayer
from torch import nn

from random_ltd.config import HadSkipConfig
from random_ltd.layers.hadskip import HadSkipLayer

__all__ = ["MegatronHadSkipLayer", "convert_bert_to_hadskip"]

_REFUSED_KWARGS = ("context", "inference_context", "packed_seq_params", "rotary_pos_emb", "rotary_pos_cos",
                   "rotary_pos_sin", "rotary_pos_cos_sin", "attention_bias", "sequence_len_offset")


def _real_tokens(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``[b, s]`` 1 = real token, from megatron's BERT mask (True = masked), for the gate's pooling."""
    if mask is None:
        return None
    if mask.dim() != 4:
        raise ValueError(f"attention_mask must be [b, 1, s, s] or [b, 1, 1, s], got {list(mask.shape)}")
    masked = mask[:, 0, 0] if mask.shape[2] == 1 else mask[:, 0].diagonal(dim1=-2, dim2=-1)
    return (~masked.bool()).to(torch.long)


class MegatronHadSkipLayer(HadSkipLayer):
    """``HadSkipLayer`` around a megatron-core ``TransformerLayer``, called like that layer."""

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs: Any):
        for name in _REFUSED_KWARGS:
            if kwargs.get(name) is not None:
                raise NotImplementedError(f"HadSkip layer {self.layer_id}: {name} is not supported")
        x = hidden_states.transpose(0, 1)  # [s, b, h] -> [b, s, h]
        out = super().forward(x, attention_mask=attention_mask, gate_mask=_real_tokens(attention_mask))
        return out.transpose(0, 1).contiguous(), None

    def run_layer(self, hidden: torch.Tensor, *args: Any, attention_mask: torch.Tensor | None = None,
                  **kwargs: Any) -> torch.Tensor:
        out, _ = self.layer(hidden_states=hidden.transpose(0, 1), attention_mask=attention_mask)
        return out.transpose(0, 1)


def _refusals(config: Any) -> list[str]:
    reasons = [f"{name}={getattr(config, name)}: not supported with HadSkip yet"
               for name in ("tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size")
               if getattr(config, name, 1) > 1]
    if getattr(config, "recompute_granularity", None) == "full":
        reasons.append("recompute_granularity='full': megatron recomputes only TransformerLayer instances")
    return reasons


def convert_bert_to_hadskip(model: nn.Module, config: HadSkipConfig | dict) -> list[MegatronHadSkipLayer]:
    """Gate every encoder layer of a megatron-core ``BertModel`` in place; returns the gated layers.

    Args:
        model: a ``BertModel`` (its ``encoder.layers`` are ``TransformerLayer`` s).
        config: a :class:`HadSkipConfig`, or a dict holding the ``hadskip`` block (see ``HadSkipConfig.from_file``).

    Raises:
        ConfigError: a bad block, or ``num_layers`` that disagrees with the model. NotImplementedError: an
        unsupported parallel/recompute setting. TypeError: the model has no megatron encoder layers.
    """
    cfg = config if isinstance(config, HadSkipConfig) else HadSkipConfig.from_file(config)
    layers = getattr(getattr(model, "encoder", None), "layers", None)
    if not isinstance(layers, nn.ModuleList) or not all(isinstance(m, (TransformerLayer, MegatronHadSkipLayer))
                                                          for m in layers):
        raise TypeError(f"model must be a megatron-core BertModel (encoder.layers of TransformerLayer), "
                        f"got {type(model).__name__}")
    if cfg.num_layers is not None and cfg.num_layers != len(layers):
        from random_ltd.config import HADSKIP_PATH, ConfigError, ConfigIssue

        raise ConfigError([ConfigIssue(f"{HADSKIP_PATH}.num_layers", f"{cfg.num_layers} != {len(layers)} encoder "
                                       "layers in the model")])
    reasons = _refusals(model.config)
    if reasons:
        raise NotImplementedError("HadSkip on megatron-core: " + "; ".join(reasons))
    gated = []
    for i, layer in enumerate(layers):
        if not isinstance(layer, MegatronHadSkipLayer):
            param = next(layer.parameters())
            layers[i] = MegatronHadSkipLayer(layer, model.config.hidden_size, layer_id=i, estimator=cfg.estimator,
                                             tau=cfg.tau, gate_hidden=cfg.gate_hidden, pooling=cfg.pooling,
                                             init_keep_logit=cfg.init_keep_logit).to(param.device)
        gated.append(layers[i])
    return gated
