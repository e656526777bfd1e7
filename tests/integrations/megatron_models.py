"""Tiny megatron-core GPT/BERT builders for the integration tests (CPU, gloo, shim applied)."""

from __future__ import annotations

import os

import torch
import torch.distributed as dist
from netutil import free_port

import random_ltd.integrations.megatron as rltd_megatron  # applies the CPU shim first
from random_ltd.integrations.megatron import bert_layer_spec, gpt_layer_specs

VOCAB = 64


def init_parallel(tp: int = 1, sp: bool = False) -> None:
    """Process group (gloo) and megatron parallel state; reuses a group another test created."""
    from megatron.core import parallel_state, tensor_parallel

    if not dist.is_initialized():
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(free_port()))
        dist.init_process_group("gloo", rank=0, world_size=1)
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(tp, 1)
        tensor_parallel.model_parallel_cuda_manual_seed(1234)
    assert rltd_megatron.cpu_shim_applied()


def gpt_config(num_layers: int = 4, **kw):
    from megatron.core.transformer.transformer_config import TransformerConfig

    base = dict(num_layers=num_layers, hidden_size=32, num_attention_heads=4, use_cpu_initialization=True,
                hidden_dropout=0.0, attention_dropout=0.0)
    base.update(kw)
    return TransformerConfig(**base)


def build_gpt(config, random_ltd: bool, position_embedding_type: str = "rope", seq_len: int = 32, seed: int = 0):
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    torch.manual_seed(seed)
    spec = gpt_layer_specs(config.num_layers) if random_ltd else get_gpt_layer_local_spec()
    return GPTModel(config, spec, vocab_size=VOCAB, max_sequence_length=seq_len,
                    position_embedding_type=position_embedding_type)


def build_bert(config, random_ltd: bool, seq_len: int = 32, seed: int = 0):
    from megatron.core.models.bert.bert_layer_specs import bert_layer_local_spec
    from megatron.core.models.bert.bert_model import BertModel

    torch.manual_seed(seed)
    spec = bert_layer_spec() if random_ltd else bert_layer_local_spec
    return BertModel(config=config, transformer_layer_spec=spec, vocab_size=VOCAB, max_sequence_length=seq_len,
                     num_tokentypes=0, add_binary_head=False)
