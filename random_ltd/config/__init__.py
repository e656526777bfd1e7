"""Typed, validated configuration: the DeepSpeed random-LTD block (+ extensions), LayerToken LR, skip_layer, hadskip.

One module per method; everything public is re-exported here, so ``from random_ltd.config import X`` is the import
to use:

* :mod:`random_ltd.config.common`: :class:`ConfigError` / :class:`ConfigIssue`, scalar types, the base model and
  DeepSpeed-config file reading shared by every block.
* :mod:`random_ltd.config.random_ltd`: ``data_efficiency.data_routing.random_ltd`` (schema, differences from
  DeepSpeed and extensions are documented there), MSLG schedule, layer sets, TokenBypass.
* :mod:`random_ltd.config.layer_token_lr`: LayerToken LR in both its block forms.
* :mod:`random_ltd.config.skip_layer`, :mod:`random_ltd.config.hadskip`: the ``skip_layer`` and ``hadskip`` blocks.
"""

from random_ltd.config.common import (
    MAX_LAYERS,
    RANDOM_LTD_PATH,
    ConfigError,
    ConfigIssue,
    Int,
    KeepRatio,
    LayerKey,
    Real,
    Seed,
    load_deepspeed_config,
    read_config_file,
)
from random_ltd.config.hadskip import (
    HADSKIP_PATH,
    HadSkipConfig,
    HadSkipHomotopicConfig,
    HadSkipStagesConfig,
    NonNegativeReal,
    PositiveReal,
)
from random_ltd.config.layer_token_lr import (
    LAYER_TOKEN_LR_SCHEDULER_TYPE,
    SCHEDULER_PARAMS_PATH,
    DecayType,
    LayerTokenLRConfig,
    LayerTokenLRSchedule,
    WarmupType,
)
from random_ltd.config.random_ltd import (
    HiddenStateOrder,
    LayerSet,
    RandomLTDConfig,
    ScheduleConfig,
    ScheduleParams,
    ScheduleType,
    TokenBypassConfig,
    layer_set_ids,
    layer_token_lr_config_from_deepspeed,
)
from random_ltd.config.skip_layer import SKIP_LAYER_PATH, SkipLayerConfig

__all__ = [
    "RANDOM_LTD_PATH",
    "ConfigError",
    "ConfigIssue",
    "LayerTokenLRConfig",
    "LayerTokenLRSchedule",
    "RandomLTDConfig",
    "ScheduleConfig",
    "ScheduleParams",
    "layer_token_lr_config_from_deepspeed",
    "LayerSet",
    "TokenBypassConfig",
    "layer_set_ids",
    "SKIP_LAYER_PATH",
    "SkipLayerConfig",
    "HADSKIP_PATH",
    "HadSkipConfig",
    "HadSkipHomotopicConfig",
    "HadSkipStagesConfig",
    "MAX_LAYERS",
    "load_deepspeed_config",
    "read_config_file",
]

# Public names outside __all__ that stay importable from here (the field types; they were attributes of the
# single config module before the split). Listed so that the imports above are not unused.
_ALSO_EXPORTED = (Int, KeepRatio, LayerKey, Real, Seed, NonNegativeReal, PositiveReal, LAYER_TOKEN_LR_SCHEDULER_TYPE,
                  SCHEDULER_PARAMS_PATH, DecayType, WarmupType, ScheduleType, HiddenStateOrder)
