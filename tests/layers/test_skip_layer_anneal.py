"""SkipLayer router annealing (Gumbel noise / temperature toward their final values) and sampled evaluation.

The failure these guard against: a router trained with Gumbel noise 1 throughout and evaluated by argmax routes
differently in eval than in training (issue 15 item 7). Annealing the noise to 0 makes the last training steps use
exactly the eval decisions; ``sampled_routing`` measures the model under training-style sampling.
"""

from __future__ import annotations

import math

import pytest
import torch

from random_ltd.config import ConfigError, SkipLayerConfig
from random_ltd.layers import anneal_skip_layers, sampled_routing
from random_ltd.layers.routers import SkipRouter, anneal_value
from random_ltd.layers.skip_layer import SkipLayer, SkipLayerOptions, TinyDecoder, find_skip_layers


@pytest.mark.parametrize("shape", ["linear", "cosine"])
def test_anneal_value_endpoints_monotone_and_clamped(shape: str) -> None:
    values = [anneal_value(t, 10, 1.0, 0.0, shape) for t in range(15)]
    assert values[0] == 1.0 and values[10:] == [0.0] * 5
    assert all(a >= b for a, b in zip(values, values[1:]))
    mid = anneal_value(5, 10, 1.0, 0.0, shape)
    assert mid == pytest.approx(0.5)  # both shapes pass through the midpoint at half time
    quarter = anneal_value(25, 100, 2.0, 0.5, shape)
    expected = {"linear": 2.0 - 1.5 * 0.25, "cosine": 2.0 - 1.5 * 0.5 * (1 - math.cos(math.pi / 4))}[shape]
    assert quarter == pytest.approx(expected)


def test_anneal_value_errors_name_the_argument() -> None:
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        anneal_value(-1, 10, 1.0, 0.0)
    with pytest.raises(ValueError, match="steps must be an int >= 1"):
        anneal_value(0, 0, 1.0, 0.0)
    with pytest.raises(ValueError, match="shape must be one of"):
        anneal_value(0, 10, 1.0, 0.0, "exp")  # type: ignore[arg-type]


def test_options_schedule_and_validation() -> None:
    opts = SkipLayerOptions(gumbel_noise=1.0, temperature=2.0, anneal_steps=4, temperature_final=0.5)
    assert [opts.noise_at(t) for t in range(6)] == [1.0, 0.75, 0.5, 0.25, 0.0, 0.0]
    assert [opts.temperature_at(t) for t in (0, 2, 4, 9)] == [2.0, 1.25, 0.5, 0.5]
    const = SkipLayerOptions(gumbel_noise=0.7, temperature=1.3)
    assert const.noise_at(10**6) == 0.7 and const.temperature_at(10**6) == 1.3
    keep_temp = SkipLayerOptions(anneal_steps=3)  # temperature_final None: only the noise anneals
    assert keep_temp.temperature_at(2) == 1.0 and keep_temp.noise_at(3) == 0.0
    for bad, match in [({"anneal_steps": 0}, "anneal_steps"), ({"anneal_steps": True}, "anneal_steps"),
                       ({"gumbel_noise_final": -0.1}, "gumbel_noise_final"),
                       ({"temperature_final": 0.0}, "temperature_final"), ({"anneal_shape": "step"}, "anneal_shape")]:
        with pytest.raises(ValueError, match=match):
            SkipLayerOptions(**bad)


def _model(**opts) -> TinyDecoder:
    torch.manual_seed(0)
    return TinyDecoder(vocab_size=32, hidden_size=16, num_heads=2, num_layers=3, max_len=16,
                       skip=SkipLayerOptions(capacity=0.5, **opts))


def test_anneal_skip_layers_sets_every_router_and_reports_means() -> None:
    model = _model(anneal_steps=10, temperature_final=0.25)
    layers = find_skip_layers(model)
    assert len(layers) == 3
    for step, noise, temp in [(0, 1.0, 1.0), (5, 0.5, 0.625), (10, 0.0, 0.25), (50, 0.0, 0.25)]:
        got = anneal_skip_layers(model, step)
        assert got == pytest.approx({"skip_layer/gumbel_noise": noise, "skip_layer/temperature": temp})
        assert all(m.router.gumbel_noise == pytest.approx(noise) for m in layers)
        assert all(m.router.temperature == pytest.approx(temp) for m in layers)
    # without annealing it is a no-op that reports the constant values
    plain = _model()
    assert anneal_skip_layers(plain, 123) == {"skip_layer/gumbel_noise": 1.0, "skip_layer/temperature": 1.0}


def _decisions(model: TinyDecoder, x: torch.Tensor, seed: int = 0) -> list[torch.Tensor]:
    model(x, generator=torch.Generator().manual_seed(seed))
    return [m.last_route.hard.detach().clone() for m in find_skip_layers(model)]


def test_annealed_training_decisions_equal_eval_decisions() -> None:
    """At the end of annealing the training forward routes exactly as eval does; before it, it does not."""
    model = _model(anneal_steps=100)
    with torch.no_grad():  # make the logits small, as early in training: noise 1 flips many decisions
        for m in find_skip_layers(model):
            m.router.proj.weight.mul_(0.1)
    x = torch.randint(0, 32, (4, 16))
    model.eval()
    with torch.no_grad():
        argmax = _decisions(model, x)
    model.train()
    anneal_skip_layers(model, 0)
    noisy = _decisions(model, x)
    assert any(not torch.equal(a, b) for a, b in zip(argmax, noisy))
    anneal_skip_layers(model, 100)
    assert all(torch.equal(a, b) for a, b in zip(argmax, _decisions(model, x)))


def test_sampled_routing_samples_in_eval_and_restores() -> None:
    model = _model().eval()
    with torch.no_grad():
        for m in find_skip_layers(model):
            m.router.proj.weight.mul_(0.1)
    x = torch.randint(0, 32, (4, 16))
    with torch.no_grad():
        argmax = _decisions(model, x)
        with sampled_routing(model) as same:
            assert same is model
            assert all(m.router.eval_noise == 1.0 for m in find_skip_layers(model))
            sampled = _decisions(model, x, seed=3)
            again = _decisions(model, x, seed=3)  # seeded: reproducible
            assert all(torch.equal(a, b) for a, b in zip(again, sampled))
        assert any(not torch.equal(a, b) for a, b in zip(argmax, sampled))
        assert all(m.router.eval_noise == 0.0 for m in find_skip_layers(model))
        assert all(torch.equal(a, b) for a, b in zip(argmax, _decisions(model, x)))
        with sampled_routing(model, noise=0.0):  # noise 0 is the argmax
            assert all(torch.equal(a, b) for a, b in zip(argmax, _decisions(model, x, seed=5)))
    with pytest.raises(ValueError, match="noise must be >= 0"):
        with sampled_routing(model, noise=-1.0):
            pass


def test_router_eval_noise_default_is_argmax() -> None:
    router = SkipRouter(8).eval()
    assert router.eval_noise == 0.0
    x = torch.randn(2, 5, 8)
    out = router(x)
    z = router.logits(x)
    assert torch.equal(out.hard, (z[..., 1] > z[..., 0]).float())


def test_config_block_builds_annealing_options() -> None:
    cfg = SkipLayerConfig.model_validate({"enabled": True, "anneal_steps": 500, "gumbel_noise_final": 0.0,
                                          "temperature_final": 0.5, "anneal_shape": "cosine"})
    opts = cfg.options(2)
    assert (opts.anneal_steps, opts.gumbel_noise_final, opts.temperature_final, opts.anneal_shape) == (
        500, 0.0, 0.5, "cosine")
    assert SkipLayerConfig().options(0).anneal_steps is None  # default: constant, as before
    for bad, key in [({"anneal_steps": 0}, "skip_layer.anneal_steps"),
                     ({"temperature_final": 0}, "skip_layer.temperature_final"),
                     ({"gumbel_noise_final": -1}, "skip_layer.gumbel_noise_final"),
                     ({"anneal_shape": "exp"}, "skip_layer.anneal_shape")]:
        with pytest.raises(ConfigError, match=key):
            SkipLayerConfig.model_validate(bad)


def test_skip_layer_wrapper_uses_annealed_router() -> None:
    """SkipLayer (the generic wrapper) anneals too: the router values drive its forward."""
    from random_ltd.layers.skip_layer import TinyDecoderLayer

    layer = SkipLayer(TinyDecoderLayer(16, 2), SkipLayerOptions(anneal_steps=2, gumbel_noise=2.0))
    anneal_skip_layers(layer, 1)
    assert layer.router.gumbel_noise == 1.0
