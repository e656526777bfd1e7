"""Layer wrappers: random-LTD (and, later, SkipLayer and HadSkip) around any transformer layer."""

from random_ltd.layers.convert import convert_to_random_ltd, find_layers, get_random_ltd_state
from random_ltd.layers.hadskip import HadSkipLayer as HadSkipLayer
from random_ltd.layers.random_ltd_layer import RandomLTDLayer, RandomLTDLayerOptions, unwrap_random_ltd, wrap_layer
from random_ltd.layers.state import LayerTokenCount, RandomLTDState

__all__ = [
    "RandomLTDLayer",
    "RandomLTDLayerOptions",
    "RandomLTDState",
    "LayerTokenCount",
    "convert_to_random_ltd",
    "find_layers",
    "get_random_ltd_state",
    "unwrap_random_ltd",
    "wrap_layer",
]
