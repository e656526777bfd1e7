"""What the CPU-extension and CUDA kernel tests share: case tables, bit-pattern data, byte-level comparison.

Data are random bit patterns (NaN payloads and all) and comparisons are on the raw bytes, so any conversion or
non-copy path shows up.
"""

from __future__ import annotations

import math

import pytest
import torch

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int32, torch.bool]
LAYOUTS = [pytest.param(False, id="sbh"), pytest.param(True, id="bsh")]

# (seq_len, keep) pairs; the 1025-long ones skip hidden 4099 to keep the suite quick.
SEQ_KEEP = [(1, 1), (97, 1), (97, 40), (97, 97), (1025, 1), (1025, 300), (1025, 1025)]
GATHER_CASES = [
    pytest.param(s, k, h, id=f"s{s}-k{k}-h{h}") for h in (1, 7, 1000, 4099) for s, k in SEQ_KEEP
    if not (h == 4099 and s == 1025)
]

# (layers, batch, seq_len, keep, seed, step, micro_batch, layer_offset)
SAMPLER_CASES = [
    (1, 1, 1, 1, 0, 0, 0, 0),
    (2, 3, 97, 1, 1, 0, 0, 0),
    (2, 3, 97, 97, 1, 0, 0, 0),
    (3, 4, 97, 50, 123, 7, 1, 2),
    (1, 2, 1025, 512, 2**32 + 5, 2**33 + 1, 3, 0),
    (4, 8, 2048, 128, 1234, 100_000, 0, 1),
    (2, 2, 2048, 1920, 2**63 - 1, 2**63 - 1, 2**32 - 1, 2**32 - 3),
    (22, 2, 512, 256, 42, 5, 7, 1),
    (1, 2, 32768, 4096, 99, 3, 0, 5),
    (1, 1, 32768, 1, 99, 3, 0, 5),
    (1, 1, 40000, 39999, 5, 0, 0, 0),
    # around the CUDA sampler's register cache (the first 4096 positions are hashed once, the rest every pass)
    (3, 2, 4096, 1000, 17, 2, 1, 3),
    (2, 2, 4097, 4096, 18, 0, 0, 0),
    (1, 3, 4097, 2, 19, 1, 2, 0),
    (1, 2, 6145, 5000, 20, 4, 0, 7),
]


def sampler_case_id(case: tuple[int, ...]) -> str:
    return "L{}-B{}-s{}-k{}-seed{}-step{}-mb{}-off{}".format(*case)


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """CPU tensor of arbitrary bit patterns (signalling NaNs, payloads, infs, denormals; bool: 0/1): only a byte
    copy keeps them."""
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=gen).bool()
    nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
    return torch.randint(0, 256, (nbytes,), dtype=torch.uint8, generator=gen).view(dtype).view(shape)


_INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_int(t: torch.Tensor) -> torch.Tensor:
    """Same bytes as an integer tensor (complex128: int64 with the last dim doubled, fine for row copies).

    The oracle runs on these views: torch's own float kernels do not preserve NaN bits (CPU ``scatter_`` on bf16
    rewrites every NaN to 0xFFFF), while the ops must copy bytes exactly.
    """
    if t.dtype == torch.bool:
        return t
    size = t.element_size()
    return t.view(torch.int64) if size == 16 else t.view(_INT_OF_SIZE[size])


def bits(t: torch.Tensor) -> torch.Tensor:
    """Raw bytes of a tensor on the CPU, for bitwise comparison (NaN == NaN when the bits agree)."""
    return t.cpu().contiguous().view(torch.uint8)


def assert_bitwise_equal(actual: torch.Tensor, expected: torch.Tensor) -> None:
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    assert actual.is_contiguous()
    assert torch.equal(bits(actual), bits(expected))


def random_indices(b: int, s: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """Distinct, deliberately unsorted positions per row (CPU): the ops must not rely on the sampler's order."""
    return torch.stack([torch.randperm(s, generator=gen)[:k] for _ in range(b)])


def reference_slice(mask: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Fancy-indexing form of slice_attention_mask."""
    rows = []
    for i in range(idx.shape[0]):
        m = mask[i if mask.shape[0] > 1 else 0]
        rows.append(m[:, idx[i]][:, :, idx[i]])
    return torch.stack(rows)
