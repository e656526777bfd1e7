"""HadSkip for Hugging Face BERT/RoBERTa sequence classifiers (transformers 5.x).

:class:`HadSkipForSequenceClassification` wraps every ``BertLayer``/``RobertaLayer`` of a
``BertForSequenceClassification`` or ``RobertaForSequenceClassification`` in a
:class:`~random_ltd.layers.hadskip.HadSkipLayer` (the wrapped model is changed in place; its layers' state-dict keys
gain ``.layer``) and runs embeddings -> gated layers -> head itself, returning a
:class:`~random_ltd.layers.hadskip.HadSkipOutput` with embeddings, per-layer hidden states, head-averaged attention
maps (recorded by a hook on each layer's self-attention, which needs ``attn_implementation="eager"``) and gates.
The gates pool the layer input by a masked mean over the non-padding tokens (``pooling="mean"``) or take [CLS].

With gating off (:func:`~random_ltd.layers.hadskip.set_gating`), the logits are bitwise those of the original
model's forward in eval mode.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from random_ltd.config import HadSkipConfig
from random_ltd.layers.hadskip import HadSkipLayer, HadSkipOutput, collect_gates

try:
    from transformers import BertForSequenceClassification, RobertaForSequenceClassification
    from transformers.masking_utils import create_bidirectional_mask
except ImportError as exc:  # pragma: no cover - only without transformers
    raise ImportError("random_ltd.integrations.transformers.hadskip needs transformers >= 5 "
                      "(pip install transformers)") from exc

__all__ = ["HadSkipForSequenceClassification"]


def _record_attention(module: nn.Module, args: Any, output: Any) -> None:
    """Forward hook on a self-attention module: keep its head-averaged probabilities ``[b, s, s]`` when asked.

    The state lives on the module (not in a closure over the adapter), so a deepcopy (the KD teacher) records
    into its own modules.
    """
    if getattr(module, "_hadskip_record", False) and isinstance(output, tuple) and output[1] is not None:
        module._hadskip_attention = output[1].mean(dim=1)


class HadSkipForSequenceClassification(nn.Module):
    """A BERT/RoBERTa sequence classifier with HadSkip gates before every encoder layer.

    Args:
        model: ``BertForSequenceClassification`` or ``RobertaForSequenceClassification`` (random init or fine-tuned).
        estimator, tau, gate_hidden, pooling, init_keep_logit: gate options (see ``HadSkipLayer``); or pass
            ``config`` (a :class:`~random_ltd.config.HadSkipConfig`) to take them from the ``hadskip`` block.
        record_attentions: return head-averaged attention maps for ``L_att`` (needs eager attention); set the
            attribute to False for inference-only use. Under real skipping a map covers only the sequences that ran
            the layer, so the maps are meant for training (masked computation) and the teacher.

    Raises:
        TypeError: ``model`` is not one of the supported classes.
        ValueError: ``record_attentions`` with a non-eager attention implementation.
    """

    def __init__(self, model: nn.Module, *, config: HadSkipConfig | None = None, estimator: str = "reinmax",
                 tau: float = 1.0, gate_hidden: int | None = None, pooling: str = "mean",
                 init_keep_logit: float = 2.0, record_attentions: bool = True) -> None:
        super().__init__()
        if isinstance(model, BertForSequenceClassification):
            self.kind, base = "bert", model.bert
        elif isinstance(model, RobertaForSequenceClassification):
            self.kind, base = "roberta", model.roberta
        else:
            raise TypeError(f"model must be a BertForSequenceClassification or RobertaForSequenceClassification, got "
                            f"{type(model).__name__}")
        impl = getattr(model.config, "_attn_implementation", None)
        if record_attentions and impl != "eager":
            raise ValueError(f"record_attentions needs eager attention (attention maps for L_att), but the model uses "
                             f"{impl!r}: build it with attn_implementation='eager' or pass record_attentions=False")
        if config is not None:
            estimator, tau, gate_hidden = config.estimator, config.tau, config.gate_hidden
            pooling, init_keep_logit = config.pooling, config.init_keep_logit
        self.model = model
        self.record_attentions = record_attentions
        hidden = model.config.hidden_size
        layers = base.encoder.layer
        for i in range(len(layers)):
            if not isinstance(layers[i], HadSkipLayer):
                layers[i] = HadSkipLayer(layers[i], hidden, layer_id=i, estimator=estimator, tau=tau,
                                         gate_hidden=gate_hidden, pooling=pooling, init_keep_logit=init_keep_logit)
        for layer in layers:
            attn = layer.layer.attention.self
            if not getattr(attn, "_hadskip_hooked", False):
                attn.register_forward_hook(_record_attention)
                attn._hadskip_hooked = True
            attn._hadskip_record = False
            attn._hadskip_attention = None

    @property
    def base(self) -> nn.Module:
        """The BertModel / RobertaModel."""
        return self.model.bert if self.kind == "bert" else self.model.roberta

    @property
    def layers(self) -> nn.ModuleList:
        """The gated encoder layers."""
        return self.base.encoder.layer

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> HadSkipOutput:
        """``input_ids`` [b, s], ``attention_mask`` [b, s] (1 = token, 0 = padding) -> :class:`HadSkipOutput`."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [b, s], got {getattr(input_ids, 'shape', type(input_ids).__name__)}")
        base = self.base
        emb = base.embeddings(input_ids=input_ids, token_type_ids=token_type_ids)
        mask4d = create_bidirectional_mask(config=base.config, inputs_embeds=emb, attention_mask=attention_mask)
        attn_modules = [layer.layer.attention.self for layer in self.layers]
        for attn in attn_modules:
            attn._hadskip_record, attn._hadskip_attention = self.record_attentions, None
        x = emb
        hidden = []
        for layer in self.layers:
            x = layer(x, mask4d, gate_mask=attention_mask)
            hidden.append(x)
        if self.kind == "bert":
            pooled = base.pooler(x) if base.pooler is not None else x[:, 0]
            logits = self.model.classifier(self.model.dropout(pooled))
        else:
            logits = self.model.classifier(x)
        attentions = []
        for attn in attn_modules:
            attentions.append(attn._hadskip_attention)
            attn._hadskip_record, attn._hadskip_attention = False, None
        gates = collect_gates(self.layers) if self.layers[0].gating else None
        return HadSkipOutput(logits, emb, hidden, attentions, gates, attention_mask)
