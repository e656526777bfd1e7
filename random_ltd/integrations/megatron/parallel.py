"""megatron-core's process groups in the ``mpu`` form DeepSpeed's engine expects (``deepspeed.initialize(mpu=...)``).

With tensor parallelism, DeepSpeed must average gradients over the data-parallel group only, and random-LTD must
fold the *data-parallel* rank into its seed so that tensor-parallel ranks draw the same indices; both read it here.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

__all__ = ["deepspeed_mpu", "SequenceParallelLayerNorm", "allreduce_sequence_parallel_grads"]


class SequenceParallelLayerNorm(torch.nn.LayerNorm):
    """torch LayerNorm for megatron-core specs under sequence parallelism (the local ``WrappedTorchNorm`` refuses it).

    Its parameters are marked ``sequence_parallel``: each tensor-parallel rank sees a different shard of the
    sequence, so their gradients must be summed over the tensor-parallel group before the optimizer step
    (``allreduce_sequence_parallel_grads``; megatron's own DDP does it in ``finalize_model_grads``).
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5) -> None:
        super().__init__(hidden_size, eps=eps)
        for p in self.parameters():
            p.sequence_parallel = True


def allreduce_sequence_parallel_grads(model: torch.nn.Module) -> int:
    """Sum the gradients of ``sequence_parallel`` parameters over the tensor-parallel group; returns how many.

    Call after backward and before the optimizer step when training with sequence parallelism outside megatron's
    DDP (e.g. on the DeepSpeed engine with ZeRO stage 0).
    """
    from megatron.core import parallel_state as ps

    grads = [p.grad for p in model.parameters() if getattr(p, "sequence_parallel", False) and p.grad is not None]
    if grads and ps.get_tensor_model_parallel_world_size() > 1:
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat, group=ps.get_tensor_model_parallel_group())
        for g, new in zip(grads, flat.split([g.numel() for g in grads])):
            g.copy_(new.view_as(g))
    return len(grads)


def deepspeed_mpu() -> SimpleNamespace:
    """An ``mpu`` object for ``deepspeed.initialize`` / ``random_ltd.initialize`` backed by ``parallel_state``.

    Model parallel = tensor parallel here (pipeline parallelism is not supported with random-LTD yet).

    Raises:
        RuntimeError: ``parallel_state.initialize_model_parallel`` has not been called.
    """
    from megatron.core import parallel_state as ps

    if not ps.model_parallel_is_initialized():
        raise RuntimeError("call megatron.core.parallel_state.initialize_model_parallel(...) before deepspeed_mpu()")
    if ps.get_pipeline_model_parallel_world_size() > 1:
        raise NotImplementedError("random-LTD with pipeline_model_parallel_size > 1 is not supported yet")
    return SimpleNamespace(
        get_data_parallel_group=lambda: ps.get_data_parallel_group(),
        get_data_parallel_rank=lambda: ps.get_data_parallel_rank(),
        get_data_parallel_world_size=lambda: ps.get_data_parallel_world_size(),
        get_model_parallel_group=lambda: ps.get_tensor_model_parallel_group(),
        get_model_parallel_rank=lambda: ps.get_tensor_model_parallel_rank(),
        get_model_parallel_world_size=lambda: ps.get_tensor_model_parallel_world_size(),
        get_tensor_model_parallel_group=lambda: ps.get_tensor_model_parallel_group(),
        get_tensor_model_parallel_rank=lambda: ps.get_tensor_model_parallel_rank(),
        get_tensor_model_parallel_world_size=lambda: ps.get_tensor_model_parallel_world_size(),
        get_tensor_model_parallel_src_rank=lambda: ps.get_tensor_model_parallel_src_rank(),
    )
