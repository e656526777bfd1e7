"""The HF adapters across transformers releases: the KV cache under every argument name (5.24+ ``cache``, 5.x
``past_key_values``, 4.x ``past_key_value``/``layer_past``), by keyword and by position, and one HF-aware wrapper
whichever entry point converts the model."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

from test_transformers_convert import KEEP, B, S, block, make  # noqa: E402
from transformers import DynamicCache  # noqa: E402

from random_ltd.integrations.transformers import HFRandomLTDLayer, convert  # noqa: E402
from random_ltd.integrations.transformers._cache import CACHE_NAMES, find_cache  # noqa: E402
from random_ltd.layers import convert_to_random_ltd, unwrap_random_ltd  # noqa: E402


def filled_cache(model, inputs) -> DynamicCache:
    cache = DynamicCache(config=model.config)
    model.eval()
    with torch.no_grad():
        model(**inputs, use_cache=True, **{"cache" if "cache" in _model_params(model) else "past_key_values": cache})
    assert cache.get_seq_length(0) == S
    return cache


def _model_params(model) -> set[str]:
    import inspect

    return set(inspect.signature(type(model).forward).parameters)


@pytest.mark.parametrize("name", ["cache", "past_key_values", "past_key_value", "layer_past"])
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_filled_cache_by_keyword_is_refused_in_training(arch, name):
    """Under whichever name the cache is passed, a filled one is seen (and refused) before any compute."""
    model, layers, inputs = make(arch)
    cache = filled_cache(model, inputs)
    convert(model, block()).advance(0, {1: KEEP, 2: KEEP})
    layer = layers[1].train()
    x = torch.randn(B, 4, 32)
    with pytest.raises(ValueError, match=f"{name} already holds {S} tokens"):
        layer(x, **{name: cache})


def test_filled_cache_positionally_is_refused_in_training():
    """GPT2Block takes the cache as its second positional argument (``layer_past`` in 4.x, ``cache`` in 5.24)."""
    model, layers, inputs = make("gpt2")
    cache = filled_cache(model, inputs)
    convert(model, block()).advance(0, {1: KEEP, 2: KEEP})
    layer = layers[1].train()
    with pytest.raises(ValueError, match="already holds"):
        layer(torch.randn(B, 4, 32), cache)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_filled_cache_through_the_model_is_refused_in_training(arch):
    model, layers, inputs = make(arch)
    cache = filled_cache(model, inputs)
    convert(model, block()).advance(0, {1: KEEP, 2: KEEP})
    model.train()
    with pytest.raises(ValueError, match="filled KV cache"):
        model(input_ids=inputs["input_ids"][:, :4], past_key_values=cache, use_cache=True)


def test_find_cache_every_name_and_bound_kwargs():
    marker = object()
    for name in CACHE_NAMES:
        assert find_cache({name: marker}) is marker
        assert find_cache({"kwargs": {name: marker}}) is marker
    assert find_cache({"cache": None, "past_key_values": marker}) is marker
    assert find_cache({"hidden_states": 1}) is None


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "vit"])
def test_every_entry_point_gives_the_hf_aware_layer(arch):
    """convert_to_random_ltd (what random_ltd.initialize calls) wraps HF layers with the HF mixin too: eval and
    no-grad forwards run the original layer, and the HF input checks apply."""
    model, layers, inputs = make(arch)
    convert_to_random_ltd(model, config=block())
    assert all(isinstance(m, HFRandomLTDLayer) for m in list(layers)[1:-1])
    unwrap_random_ltd(model)
    assert not any(isinstance(m, HFRandomLTDLayer) for m in model.modules())
    convert(model, block())
    assert all(isinstance(m, HFRandomLTDLayer) for m in list(layers)[1:-1])


def test_generic_entry_point_runs_the_hf_checks():
    model, layers, inputs = make("llama")
    cache = filled_cache(model, inputs)
    state = convert_to_random_ltd(model, config=block())
    state.advance(0, {1: KEEP, 2: KEEP})
    model.train()
    with pytest.raises(ValueError, match="filled KV cache"):
        model(input_ids=inputs["input_ids"][:, :4], past_key_values=cache, use_cache=True)
    with torch.no_grad():  # generate()-style no-grad forward in training mode: the original layers, untouched
        model(**inputs, use_cache=False)
