"""Layer wrappers around any transformer layer: random-LTD (and TokenBypass), SkipLayer, HadSkip."""

from random_ltd.layers.convert import convert_to_random_ltd, find_layers, get_random_ltd_state
from random_ltd.layers.hadskip import HadSkipLayer
from random_ltd.layers.random_ltd_layer import RandomLTDLayer, RandomLTDLayerOptions, unwrap_random_ltd, wrap_layer
from random_ltd.layers.skip_layer import (
    SkipLayer,
    SkipLayerOptions,
    anneal_skip_layers,
    sampled_routing,
    skip_layer_aux_loss,
)
from random_ltd.layers.state import LayerTokenCount, RandomLTDState
from random_ltd.layers.token_bypass import TokenBypassState, select_bypass_indices

__all__ = [
    "HadSkipLayer",
    "SkipLayer",
    "SkipLayerOptions",
    "skip_layer_aux_loss",
    "anneal_skip_layers",
    "sampled_routing",
    "RandomLTDLayer",
    "RandomLTDLayerOptions",
    "RandomLTDState",
    "TokenBypassState",
    "select_bypass_indices",
    "LayerTokenCount",
    "convert_to_random_ltd",
    "find_layers",
    "get_random_ltd_state",
    "unwrap_random_ltd",
    "wrap_layer",
]
