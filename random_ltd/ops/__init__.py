"""Token ops shared by random-LTD, SkipLayer and HadSkip.

``sample_sorted_indices`` picks the kept tokens, ``gather_tokens`` / ``scatter_tokens`` move them (differentiable),
``token_drop`` / ``token_combine`` are the fused pair a wrapped layer uses (its backward writes the input gradient in
one pass), ``slice_attention_mask`` / ``gather_positions`` restrict masks and positions to them. Each op dispatches
to the CUDA, C++ CPU or torch reference backend (``random_ltd.ops.dispatch``; ``python -m random_ltd.info`` tells
which).
"""

from random_ltd.ops.dispatch import backend_report, select_backend
from random_ltd.ops.fused import DroppedTokens, token_combine, token_drop
from random_ltd.ops.token_ops import (
    gather_positions,
    gather_tokens,
    sample_sorted_indices,
    scatter_tokens,
    slice_attention_mask,
)

__all__ = [
    "sample_sorted_indices",
    "gather_tokens",
    "scatter_tokens",
    "slice_attention_mask",
    "gather_positions",
    "token_drop",
    "token_combine",
    "DroppedTokens",
    "select_backend",
    "backend_report",
]
