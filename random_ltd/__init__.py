"""random_ltd: random and layerwise token dropping (random-LTD) for DeepSpeed and Megatron-core training.

Typical use, with the random-LTD block in the DeepSpeed config::

    engine, optimizer, _, lr_scheduler = random_ltd.initialize(model=model, config="ds_config.json",
                                                               model_parameters=model.parameters())
"""

from random_ltd import ops
from random_ltd.config import ConfigError, LayerTokenLRConfig, RandomLTDConfig, layer_token_lr_config_from_deepspeed
from random_ltd.layers import RandomLTDLayer, RandomLTDState, convert_to_random_ltd, unwrap_random_ltd
from random_ltd.schedules import LayerTokenLR, MSLGSchedule

__version__ = "0.1.0"


def initialize(*args, **kwargs):
    """Drop-in for ``deepspeed.initialize`` (see ``random_ltd.integrations.deepspeed.initialize``)."""
    from random_ltd.integrations.deepspeed import initialize as _initialize

    return _initialize(*args, **kwargs)


__all__ = [
    "ops",
    "ConfigError",
    "RandomLTDConfig",
    "LayerTokenLRConfig",
    "layer_token_lr_config_from_deepspeed",
    "RandomLTDLayer",
    "RandomLTDState",
    "convert_to_random_ltd",
    "unwrap_random_ltd",
    "MSLGSchedule",
    "LayerTokenLR",
    "initialize",
    "__version__",
]
