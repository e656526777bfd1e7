"""megatron-core's process groups in the ``mpu`` form DeepSpeed's engine expects (``deepspeed.initialize(mpu=...)``).

With tensor parallelism, DeepSpeed must average gradients over the data-parallel group only, and random-LTD must
fold the *data-parallel* rank into its seed so that tensor-parallel ranks draw the same indices; both read it here.
"""

from __future__ import annotations

from types import SimpleNamespace

__all__ = ["deepspeed_mpu"]


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
