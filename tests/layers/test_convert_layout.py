"""convert_to_random_ltd never guesses the hidden-state layout: without a config it must be told, and what it is
told is what it drops along (tokens, never batch rows)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from random_ltd.config import RandomLTDConfig
from random_ltd.layers import convert_to_random_ltd


class Probe(nn.Module):
    """Records the hidden-state shape it sees and returns its input."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        self.seen = tuple(hidden_states.shape)
        return hidden_states * 2


class Stack(nn.Module):
    def __init__(self, n: int = 4) -> None:
        super().__init__()
        self.layers = nn.ModuleList(Probe() for _ in range(n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = layer(x)
        return x


def run(model: Stack, state, x: torch.Tensor, keep: int) -> torch.Tensor:
    state.advance(0, {1: keep, 2: keep})
    model.train()
    return model(x)


def test_no_config_requires_hidden_state_order() -> None:
    with pytest.raises(ValueError, match="hidden_state_order is required when no config is given"):
        convert_to_random_ltd(Stack())


def test_seq_batch_dim_drops_tokens_not_batch_rows() -> None:
    """The issue's case: x [16, 5, 4] as [s, b, h] keeps 3 of 16 tokens for all 5 samples."""
    model = Stack()
    state = convert_to_random_ltd(model, hidden_state_order="seq_batch_dim")
    x = torch.randn(16, 5, 4)
    out = run(model, state, x, keep=3)
    assert model.layers[1].seen == (3, 5, 4) and model.layers[0].seen == (16, 5, 4)
    # layer 1 doubles only its kept tokens (then the full layers 0 and 3 double all): compare against torch.gather
    state.micro_batch = 0
    idx = state.indices(1, 5, 16, 3, x.device)  # [b, k]
    x0 = x * 2
    kept1 = torch.gather(x0, 0, idx.t()[:, :, None].expand(-1, -1, 4)) * 2
    x1 = x0.scatter(0, idx.t()[:, :, None].expand(-1, -1, 4), kept1)
    idx2 = state.indices(2, 5, 16, 3, x.device)
    kept2 = torch.gather(x1, 0, idx2.t()[:, :, None].expand(-1, -1, 4)) * 2
    x2 = x1.scatter(0, idx2.t()[:, :, None].expand(-1, -1, 4), kept2)
    assert torch.equal(out, x2 * 2)


def test_batch_seq_dim_drops_along_dim_1() -> None:
    model = Stack()
    state = convert_to_random_ltd(model, hidden_state_order="batch_seq_dim")
    run(model, state, torch.randn(5, 16, 4), keep=3)
    assert model.layers[1].seen == (5, 3, 4)


def test_hidden_state_order_must_agree_with_the_config() -> None:
    cfg = RandomLTDConfig(total_layer_num=4, hidden_state_order="batch_seq_dim")
    with pytest.raises(ValueError, match="disagrees with the config"):
        convert_to_random_ltd(Stack(), config=cfg, hidden_state_order="seq_batch_dim")
    state = convert_to_random_ltd(Stack(), config=cfg, hidden_state_order="batch_seq_dim")
    assert state.total_layers == 4


def test_hidden_state_order_value_is_checked() -> None:
    with pytest.raises(ValueError, match="hidden_state_order: expected one of"):
        convert_to_random_ltd(Stack(), hidden_state_order="sbh")  # type: ignore[arg-type]


def test_config_given_keeps_its_layout() -> None:
    model = Stack()
    cfg = {"total_layer_num": 4, "hidden_state_order": "seq_batch_dim"}
    state = convert_to_random_ltd(model, config=cfg)
    run(model, state, torch.randn(16, 5, 4), keep=3)
    assert model.layers[2].seen == (3, 5, 4)


def test_config_path_keeps_its_layout(tmp_path) -> None:
    import json

    path = tmp_path / "ds.json"
    block = {"total_layer_num": 4, "hidden_state_order": "seq_batch_dim"}
    path.write_text(json.dumps({"data_efficiency": {"data_routing": {"random_ltd": block}}}))
    model = Stack()
    state = convert_to_random_ltd(model, config=str(path))
    run(model, state, torch.randn(16, 5, 4), keep=3)
    assert model.layers[1].seen == (3, 5, 4)
