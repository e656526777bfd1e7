"""Tiny transformers used by the layer and integration tests (plain PyTorch, deterministic)."""

from __future__ import annotations

import torch
from torch import nn


class Block(nn.Module):
    """Pre-LN block with masked attention; positions enter through a sinusoidal term so that wrong positions show."""

    def __init__(self, hidden: int = 16, heads: int = 2):
        super().__init__()
        self.ln1 = nn.LayerNorm(hidden)
        self.attn = nn.MultiheadAttention(hidden, heads, batch_first=True)
        self.ln2 = nn.LayerNorm(hidden)
        self.mlp = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, hidden_states, attention_mask=None, position_ids=None):
        x = hidden_states
        if position_ids is not None:
            freq = torch.arange(x.shape[-1], device=x.device) + 1.0
            x = x + 0.1 * torch.sin(position_ids[..., None].float() / freq)
        h = self.ln1(x)
        # attention_mask: bool [b, 1, s, s], True = masked
        m = None if attention_mask is None else attention_mask[:, 0].repeat_interleave(self.attn.num_heads, 0)
        a, _ = self.attn(h, h, h, attn_mask=m, need_weights=False)
        x = x + a
        return x + self.mlp(self.ln2(x))


class TinyGPT(nn.Module):
    def __init__(self, vocab: int = 64, hidden: int = 16, layers: int = 4, seq: int = 32):
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(Block(hidden) for _ in range(layers))
        self.head = nn.Linear(hidden, vocab)
        self.seq = seq

    def run_layer(self, layer: nn.Module, x: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        return layer(x, attention_mask=mask, position_ids=pos)

    def forward(self, tokens, labels=None):
        b, s = tokens.shape
        mask = torch.ones(s, s, dtype=torch.bool, device=tokens.device).triu(1).expand(b, 1, s, s)
        pos = torch.arange(s, device=tokens.device).expand(b, s)
        x = self.embed(tokens)
        for layer in self.layers:
            x = self.run_layer(layer, x, mask, pos)
        logits = self.head(x)
        if labels is None:
            return logits
        return nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten())
