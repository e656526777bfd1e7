"""Capacity control: training a tiny byte LM on the KJV corpus with the aux loss drives every layer to r ≈ P."""

from __future__ import annotations

import pytest
import torch

from random_ltd.layers.skip_layer import SkipLayerOptions, TinyDecoder, skip_layer_aux_loss, skip_layer_capacities

corpus = pytest.importorskip("launch.corpus")


def train(aux_loss_weight: float, steps: int = 150) -> dict[int, float]:
    """Mean training capacity of each layer over the last 30 steps, starting from routers at r ≈ 0.9."""
    train_bytes, _ = corpus.load_corpus()
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    m = TinyDecoder(hidden_size=32, num_heads=4, num_layers=4, max_len=32,
                    skip=SkipLayerOptions(capacity=0.5, aux_loss_weight=aux_loss_weight))
    # start far from P: a direction c shared by every embedding, every router aligned with it (logit gap ~2)
    c = torch.randn(32)
    with torch.no_grad():
        m.embed.weight += c
        for layer in m.layers:
            layer.router.proj.weight.copy_(torch.stack([-c, c]) / c.square().sum())
    opt = torch.optim.Adam(m.parameters(), lr=1e-2)
    history = []
    for step in range(steps):
        x, y = corpus.batch_at(train_bytes, 32, 8, step, seed=0)
        logits = m(x, generator=g)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 256), y.reshape(-1)) + skip_layer_aux_loss(m)
        opt.zero_grad()
        loss.backward()
        opt.step()
        history.append(skip_layer_capacities(m))
        if step == 0:
            assert min(history[0].values()) > 0.8
    return {i: sum(h[i] for h in history[-30:]) / 30 for i in range(4)}


def test_aux_loss_drives_every_layer_capacity_to_target():
    caps = train(aux_loss_weight=0.1)
    assert all(abs(r - 0.5) <= 0.05 for r in caps.values()), caps


def test_without_aux_loss_capacity_is_not_controlled():
    caps = train(aux_loss_weight=0.0)
    assert any(abs(r - 0.5) > 0.05 for r in caps.values()), caps
