"""megatron-core integration: a random-LTD ``TransformerLayer``, GPT/BERT ModuleSpecs, and the CPU shim.

SkipLayer for megatron-core GPT lives in ``random_ltd.integrations.megatron.skip_layer`` (``gpt_skip_layer_specs``),
HadSkip for megatron-core BERT in ``random_ltd.integrations.megatron.hadskip`` (``convert_bert_to_hadskip``).

Importing this package applies ``apply_cpu_shim()`` when CUDA is absent (a no-op on GPU machines), so megatron-core
models train on CPU with gloo.
"""

from random_ltd.integrations.megatron.cpu_shim import apply_cpu_shim, cpu_shim_applied

apply_cpu_shim()

from random_ltd.integrations.megatron.layer import (  # noqa: E402 - after the shim
    RandomLTDMegatronLayer,
    RandomLTDTransformerLayer,
    unsupported_reasons,
)
from random_ltd.integrations.megatron.parallel import (  # noqa: E402
    SequenceParallelLayerNorm,
    allreduce_sequence_parallel_grads,
    deepspeed_mpu,
)
from random_ltd.integrations.megatron.specs import (  # noqa: E402
    bert_layer_spec,
    gpt_layer_specs,
    random_ltd_layer_ids,
)

__all__ = [
    "RandomLTDMegatronLayer",
    "RandomLTDTransformerLayer",
    "SequenceParallelLayerNorm",
    "allreduce_sequence_parallel_grads",
    "apply_cpu_shim",
    "bert_layer_spec",
    "cpu_shim_applied",
    "deepspeed_mpu",
    "gpt_layer_specs",
    "random_ltd_layer_ids",
    "unsupported_reasons",
]
