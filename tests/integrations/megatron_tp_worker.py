"""One rank of the tensor-parallel test: TP=2 (optionally + sequence parallel) GPT loss with random-LTD.

argv: rank world_size port sp(0|1) reference_state_dict.pt out.json
Loads the TP=1 reference weights (sharded here), runs one training forward, writes the loss and the indices.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from megatron_models import VOCAB, gpt_config  # noqa: E402

from random_ltd import RandomLTDConfig  # noqa: E402
from random_ltd.integrations.megatron import SequenceParallelLayerNorm, gpt_layer_specs  # noqa: E402
from random_ltd.layers import convert_to_random_ltd  # noqa: E402

SEQ, BATCH, KEEP = 32, 2, 12


def sp_base_spec():
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    base = get_gpt_layer_local_spec()
    sub = dataclasses.replace(base.submodules, input_layernorm=SequenceParallelLayerNorm,
                              pre_mlp_layernorm=SequenceParallelLayerNorm)
    return dataclasses.replace(base, submodules=sub)


def load_sharded(model: torch.nn.Module, full: dict, tp: int) -> None:
    own = model.state_dict()
    for name, local in own.items():
        ref = full[name]
        if not isinstance(local, torch.Tensor) or ref.shape == local.shape:
            own[name] = ref
            continue
        dim = next(d for d in range(ref.dim()) if ref.shape[d] == tp * local.shape[d])
        own[name] = ref.chunk(tp, dim)[dist.get_rank()]
    model.load_state_dict(own, strict=True)


def main() -> None:
    rank, world, port, sp, ref_path, out_path = sys.argv[1:7]
    rank, world, sp = int(rank), int(world), bool(int(sp))
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    from megatron.core import parallel_state, tensor_parallel
    from megatron.core.models.gpt import GPTModel

    parallel_state.initialize_model_parallel(world, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(1234)
    cfg = gpt_config(tensor_model_parallel_size=world, sequence_parallel=sp)
    spec = gpt_layer_specs(cfg.num_layers, base_spec=sp_base_spec() if sp else None,
                           layer_norm=SequenceParallelLayerNorm if sp else None)
    model = GPTModel(cfg, spec, vocab_size=VOCAB, max_sequence_length=SEQ, position_embedding_type="rope")
    load_sharded(model, torch.load(ref_path), world)
    state = convert_to_random_ltd(model, config=RandomLTDConfig(total_layer_num=4),
                                  data_parallel_rank=parallel_state.get_data_parallel_rank())
    state.advance(0, {1: KEEP, 2: KEEP})
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    model.train()
    loss = model(ids, pos, None, labels=ids).float().mean()
    with open(out_path, "w") as f:
        json.dump({"loss": loss.item(), "consumed": state.finish_step().consumed}, f)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
