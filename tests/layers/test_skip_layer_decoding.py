"""SkipLayer decoding (Algorithm 2): KV-cache steps equal a full recomputation with the same routing decisions, and
a layer that skips the current token does no query, attention or FFN work."""

from __future__ import annotations

import pytest
import torch

from random_ltd.layers.routers import RouterOutput
from random_ltd.layers.skip_layer import SkipKVCache, SkipLayer, SkipLayerOptions, TinyDecoder


def model(num_layers=4, seed=0, **kw) -> TinyDecoder:
    torch.manual_seed(seed)
    m = TinyDecoder(hidden_size=32, num_heads=4, num_layers=num_layers, max_len=64,
                    skip=SkipLayerOptions(**kw), skip_layers=list(range(1, num_layers)))
    for layer in m.layers:
        if isinstance(layer, SkipLayer):  # decisive routers: about half the tokens skip each layer
            torch.nn.init.normal_(layer.router.proj.weight, std=0.5)
    return m.eval()


def decode(m: TinyDecoder, prompt: torch.Tensor, steps: int):
    """Prefill, then one token per step with the cache; logits and per-layer decisions of every call."""
    cache, logits, routes = SkipKVCache(), [], []
    x = prompt
    tokens = prompt
    with torch.no_grad():
        for _ in range(steps):
            out = m(x, cache=cache)
            logits.append(out)
            routes.append([lay.last_route.hard if isinstance(lay, SkipLayer) else None for lay in m.layers])
            x = out[:, -1:].argmax(-1)
            tokens = torch.cat([tokens, x], dim=1)
    return tokens, torch.cat(logits, dim=1), routes, cache


@pytest.mark.parametrize("batch", [1, 3])
def test_kv_cache_decoding_equals_full_recomputation_with_same_decisions(batch):
    m = model()
    prompt = torch.randint(0, 256, (batch, 5))
    tokens, step_logits, routes, cache = decode(m, prompt, 12)
    per_layer = [None if routes[0][i] is None else RouterOutput(hard=torch.cat([r[i] for r in routes], dim=1))
                 for i in range(len(m.layers))]
    with torch.no_grad():
        full = m(tokens[:, :-1], routes=per_layer)
        free = m(tokens[:, :-1])  # the router alone (argmax) reaches the same decisions on the full sequence
    torch.testing.assert_close(step_logits, full, atol=1e-5, rtol=1e-5)
    for i, layer in enumerate(m.layers):
        if per_layer[i] is not None:
            assert torch.equal(layer.last_route.hard, per_layer[i].hard)
            assert 0 < per_layer[i].hard.sum() < per_layer[i].hard.numel()
    torch.testing.assert_close(free, full)
    # every layer's cache holds every position (K/V always written, Algorithm 2 line 2)
    assert {cache.get_seq_length(i) for i in range(len(m.layers))} == {tokens.shape[1] - 1}


def test_greedy_generate_returns_argmax_continuation_and_decisions():
    m = model()
    prompt = torch.randint(0, 256, (2, 4))
    tokens, decisions = m.generate(prompt, 6)
    assert tokens.shape == (2, 10) and torch.equal(tokens[:, :4], prompt)
    with torch.no_grad():
        logits = m(tokens[:, :-1])
    assert torch.equal(logits[:, 3:].argmax(-1), tokens[:, 4:])
    assert len(decisions) == 6 and decisions[0][0] is None and decisions[1][1].shape == (2, 1)


def test_skipped_layers_do_no_query_or_ffn_work_when_decoding():
    m = model(num_layers=5)
    counts = {}

    def counter(name):
        def hook(module, args, out):
            counts[name] = counts.get(name, 0) + args[0].shape[:-1].numel()
        return hook

    hooks = []
    for i, layer in enumerate(m.layers):
        inner = layer.layer if isinstance(layer, SkipLayer) else layer
        for part in ("q_proj", "k_proj", "mlp"):
            hooks.append(getattr(inner, part).register_forward_hook(counter((i, part))))
    cache = SkipKVCache()
    prompt = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        x = m(prompt, cache=cache)[:, -1:].argmax(-1)
        counts.clear()
        routed = {i: 0 for i in range(len(m.layers))}
        steps = 15
        for _ in range(steps):
            x = m(x, cache=cache)[:, -1:].argmax(-1)
            for i, layer in enumerate(m.layers):
                routed[i] += int(layer.last_route.hard.sum()) if isinstance(layer, SkipLayer) else 1
    for h in hooks:
        h.remove()
    for i in range(len(m.layers)):
        assert counts[(i, "k_proj")] == steps  # keys/values for every token in every layer
        assert counts.get((i, "q_proj"), 0) == routed[i]  # queries only for routed tokens
        assert counts.get((i, "mlp"), 0) == routed[i]  # FFN only for routed tokens (Gsize padding aside: B=1)
    assert any(routed[i] < steps for i in range(1, len(m.layers))), "some layer skipped some step"
    assert any(routed[i] > 0 for i in range(1, len(m.layers))), "some layer ran some step"


def test_cache_past_max_len_is_an_error():
    m = model()
    with pytest.raises(ValueError, match="max_len"):
        m(torch.randint(0, 256, (1, 65)))
