"""random_ltd: random and layerwise token dropping (random-LTD) for DeepSpeed and Megatron-core training."""

__version__ = "0.1.0"

from random_ltd import ops  # noqa: E402

__all__ = ["ops", "__version__"]
