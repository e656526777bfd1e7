"""A plain-PyTorch GPT (pre-LN, RoPE, causal SDPA) in Megatron's ``[s, b, h]`` layout, for step-time benchmarks.

It needs nothing beyond torch, so ``benchmarks/e2e_step.py --model plain`` runs where megatron-core is missing (the
GPU box). Its layers take ``rotary_pos_emb`` (a ``[s, 1, 1, d]`` angle table, Megatron's form) by keyword, so a
random-LTD wrapper gathers the kept positions' angles (``gather_positions``) exactly as in a megatron-core model.
With no attention mask, a layer runs causal attention over the tokens it is given: for sorted kept indices that is
the sliced causal mask, so the wrapped layer computes what random-LTD prescribes.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPTBlock", "PlainGPT", "rotary_table", "apply_rotary"]


def rotary_table(seq_len: int, head_dim: int, base: float = 10000.0, device: torch.device | str | None = None
                 ) -> torch.Tensor:
    """RoPE angles ``[s, 1, 1, head_dim]`` in fp32 (Megatron's ``rotary_pos_emb``: both halves repeated)."""
    inv = 1.0 / (base ** (torch.arange(0, head_dim, 2, device=device, dtype=torch.float32) / head_dim))
    angles = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv)
    return torch.cat([angles, angles], dim=-1)[:, None, None, :]


def apply_rotary(x: torch.Tensor, angles: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``[s, b, heads, d]`` by ``angles`` ``[s, 1|b, 1, d]`` (rotate-half form)."""
    cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class GPTBlock(nn.Module):
    """One pre-LN transformer layer: causal self-attention with RoPE, then a GELU MLP (4h)."""

    def __init__(self, hidden: int, heads: int) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        self.heads, self.head_dim = heads, hidden // heads
        self.ln1 = nn.LayerNorm(hidden)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.ln2 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, 4 * hidden)
        self.fc2 = nn.Linear(4 * hidden, hidden)

    def forward(self, hidden_states: torch.Tensor, attention_mask: torch.Tensor | None = None,
                rotary_pos_emb: torch.Tensor | None = None) -> torch.Tensor:
        s, b, h = hidden_states.shape
        q, k, v = self.qkv(self.ln1(hidden_states)).view(s, b, 3, self.heads, self.head_dim).unbind(2)
        if rotary_pos_emb is not None:
            q, k = apply_rotary(q, rotary_pos_emb), apply_rotary(k, rotary_pos_emb)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (q, k, v))  # [b, heads, s, d]
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=attention_mask, is_causal=attention_mask is None)
        hidden_states = hidden_states + self.proj(a.permute(2, 0, 1, 3).reshape(s, b, h))
        return hidden_states + self.fc2(F.gelu(self.fc1(self.ln2(hidden_states)), approximate="tanh"))


class PlainGPT(nn.Module):
    """Embedding, ``num_layers`` ``GPTBlock``s in ``self.layers``, final LayerNorm, untied LM head; returns the loss.

    ``mode`` selects what a step runs (the benchmark's arms): ``"layers"`` every layer (random-LTD decides inside the
    wrapped ones); ``"skip"`` only the first and the last layer; ``("bypass", k)`` the middle layers on the contiguous
    first ``k`` tokens (one slice before them, one concatenation after: no sampling, gather or scatter).
    """

    def __init__(self, num_layers: int, hidden: int, heads: int, vocab: int, seq_len: int) -> None:
        super().__init__()
        if num_layers < 3:
            raise ValueError(f"num_layers must be >= 3 (first, middle, last), got {num_layers}")
        self.embed = nn.Embedding(vocab, hidden)
        self.layers = nn.ModuleList(GPTBlock(hidden, heads) for _ in range(num_layers))
        self.ln_f = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, vocab, bias=False)
        self.register_buffer("rotary", rotary_table(seq_len, hidden // heads), persistent=False)
        self.mode: str | tuple[str, int] = "layers"

    def forward(self, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids).transpose(0, 1).contiguous()  # [s, b, h]
        rot = self.rotary
        first, *middle, last = self.layers
        h = first(h, rotary_pos_emb=rot)
        if self.mode == "skip":
            pass
        elif isinstance(self.mode, tuple) and self.mode[0] == "bypass":
            k = self.mode[1]
            hk = h[:k]
            for layer in middle:
                hk = layer(hk, rotary_pos_emb=rot[:k])
            h = torch.cat([hk, h[k:]], dim=0)
        elif self.mode == "layers":
            for layer in middle:
                h = layer(h, rotary_pos_emb=rot)
        else:
            raise ValueError(f"mode must be 'layers', 'skip' or ('bypass', k), got {self.mode!r}")
        h = last(h, rotary_pos_emb=rot)
        logits = self.head(self.ln_f(h))  # [s, b, vocab]
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.t().reshape(-1))
