"""Tensor parallel (TP=2) and TP=2 + sequence parallel on CPU with gloo, in two processes.

Indices must be identical on both tensor-parallel ranks, so the TP=2 loss equals the TP=1 loss computed with the
same global indices (for sequence parallelism: the stratified per-shard picks).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("megatron.core")

from megatron_models import VOCAB, build_gpt, free_port, gpt_config, init_parallel  # noqa: E402
from megatron_tp_worker import BATCH, KEEP, SEQ  # noqa: E402

from random_ltd import RandomLTDConfig  # noqa: E402
from random_ltd.layers import convert_to_random_ltd  # noqa: E402

WORKER = os.path.join(os.path.dirname(__file__), "megatron_tp_worker.py")


def _reference_loss(model, sp_shards: int | None) -> float:
    state = convert_to_random_ltd(model, config=RandomLTDConfig(total_layer_num=4))
    state.advance(0, {1: KEEP, 2: KEEP})
    if sp_shards:
        def stratified(layer_id, batch, seq_len, keep, device):
            picks = state.sharded_indices(layer_id, batch, seq_len // sp_shards, keep // sp_shards, sp_shards, device)
            offsets = torch.arange(sp_shards).mul(seq_len // sp_shards).view(-1, 1, 1)
            return (picks + offsets).permute(1, 0, 2).reshape(batch, keep)

        state.indices = stratified
    ids = torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    pos = torch.arange(SEQ)[None].expand(BATCH, SEQ)
    model.train()
    with torch.no_grad():
        return model(ids, pos, None, labels=ids).float().mean().item()


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2_sp"])
def test_tensor_parallel_loss_equals_tp1(tmp_path, sp):
    init_parallel()
    model = build_gpt(gpt_config(), random_ltd=True, seq_len=SEQ, seed=11)
    ref_path = tmp_path / "ref.pt"
    torch.save(model.state_dict(), ref_path)
    expected = _reference_loss(model, 2 if sp else None)

    port = str(free_port())
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    procs = [subprocess.Popen([sys.executable, WORKER, str(r), "2", port, str(int(sp)), str(ref_path),
                               str(tmp_path / f"out{r}.json")], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    outs = [p.communicate(timeout=600)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    results = [json.loads((tmp_path / f"out{r}.json").read_text()) for r in range(2)]
    assert results[0] == results[1]  # same indices -> same loss and layer-token count on both TP ranks
    assert results[0]["consumed"] == BATCH * (2 * SEQ + 2 * KEEP)
    assert results[0]["loss"] == pytest.approx(expected, rel=2e-6, abs=0)
