"""The benchmarks measure what they claim: bounds enforced, arms equivalent where they must be, and the GPU suite's
CPU rehearsal (``benchmarks/gpu_suite.sh --dry-run``) runs every step, so the first real GPU run cannot fail on a typo.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import e2e_step, report  # noqa: E402
from benchmarks.common import MALLOC_ENV  # noqa: E402
from benchmarks.gpt_stack import GPTBlock, PlainGPT, rotary_table  # noqa: E402


def _summary_row(kept: int, realized: float, bypass: float) -> dict:
    return {"kept": kept, "keep_ratio": kept / 512, "realized_saving": realized, "bypass_saving": bypass}


def test_check_bounds_refuses_savings_above_skip():
    rows = [_summary_row(32, 0.772, 0.70), _summary_row(128, 0.60, 0.62)]
    errors = e2e_step.check_bounds(rows, skip_saving=0.749, num_layers=8)
    assert rows[0]["realized_saving"] is None and rows[0]["realized_saving_raw"] == 0.772
    assert "measurement bug" in rows[0]["bound_violation"] and "skip" in rows[0]["bound_violation"]
    assert rows[1]["realized_saving"] == 0.60 and "bound_violation" not in rows[1]
    assert len(errors) == 1 and "kept 32" in errors[0]


def test_check_bounds_refuses_skip_above_the_share_of_layers_removed():
    rows = [{**_summary_row(32, 0.755, 0.764), "realized_over_theoretical": 1.07, "realized_over_bypass": 0.99}]
    errors = e2e_step.check_bounds(rows, skip_saving=0.80, num_layers=8)
    assert len(errors) == 1 and "(L-2)/L" in errors[0]
    # the full arm is inflated, so every saving of the run is withheld, not only those above skip's
    assert rows[0]["realized_saving"] is None and rows[0]["bypass_saving"] is None
    assert rows[0]["realized_saving_raw"] == 0.755 and "inflated" in rows[0]["bound_violation"]
    assert rows[0]["realized_over_theoretical"] is None and rows[0]["realized_over_theoretical_raw"] == 1.07
    assert e2e_step.check_bounds([_summary_row(32, 0.70, 0.71)], skip_saving=0.749, num_layers=8) == []


def test_report_marks_a_bound_violation(tmp_path):
    rows = [_summary_row(32, 0.772, 0.70)]
    errors = e2e_step.check_bounds(rows, skip_saving=0.749, num_layers=8)
    rows[0].update(theoretical_saving=0.703, realized_over_theoretical=None, realized_over_bypass=None,
                   ops_overhead_of_step=0.02)
    data = {"benchmark": "e2e_step", "model": "m", "dtype": "fp32", "iters": 5, "errors": errors,
            "env": {"device": "cpu", "torch": torch.__version__, "load_average": [1.0]},
            "bounds": {"full_step_s": 1.0, "skip_saving": 0.749, "skip_theoretical": 0.75},
            "arms": [{"name": "full", "minor_faults": 0}, {"name": "ltd@32", "minor_faults": 1}], "summary": rows}
    text = report.e2e_table(tmp_path / "x.json", data)
    assert "77.2% (withheld: measurement bug)" in text and "**measurement error**" in text


def test_arms_for_covers_every_bound_once():
    arms = e2e_step.arms_for(512, [0.0625, 0.25, 1.0, 0.25])
    names = [a[0] for a in arms]
    assert names == ["full", "skip", "ltd@32", "bypass@32", "ops@32", "ltd@128", "bypass@128", "ops@128"]


@pytest.fixture
def tiny_gpt():
    torch.manual_seed(0)
    return PlainGPT(num_layers=4, hidden=32, heads=4, vocab=50, seq_len=16).double()


def test_bypass_at_full_length_is_the_full_model(tiny_gpt):
    ids = torch.randint(0, 50, (2, 16))
    full = tiny_gpt(ids, ids)
    tiny_gpt.mode = ("bypass", 16)
    assert torch.equal(tiny_gpt(ids, ids), full)
    tiny_gpt.mode = "skip"
    assert not torch.allclose(tiny_gpt(ids, ids), full)


def test_bypass_runs_the_middle_layers_on_the_first_k_tokens(tiny_gpt):
    ids = torch.randint(0, 50, (2, 16))
    rot = tiny_gpt.rotary
    first, *middle, last = tiny_gpt.layers
    h = first(tiny_gpt.embed(ids).transpose(0, 1).contiguous(), rotary_pos_emb=rot)
    hk = h[:5]
    for layer in middle:
        hk = layer(hk, rotary_pos_emb=rot[:5])
    h = last(torch.cat([hk, h[5:]]), rotary_pos_emb=rot)
    logits = tiny_gpt.head(tiny_gpt.ln_f(h))
    expected = torch.nn.functional.cross_entropy(logits.float().view(-1, 50), ids.t().reshape(-1))
    tiny_gpt.mode = ("bypass", 5)
    torch.testing.assert_close(tiny_gpt(ids, ids), expected, rtol=0, atol=0)


def test_wrapped_plain_layer_gathers_tokens_and_rotary_angles(tiny_gpt):
    """random-LTD on the plain GPT computes the layer on the kept tokens with their own RoPE angles."""
    from random_ltd import RandomLTDConfig, convert_to_random_ltd

    state = convert_to_random_ltd(tiny_gpt, layers=tiny_gpt.layers,
                                  config=RandomLTDConfig(total_layer_num=4, hidden_state_order="seq_batch_dim"))
    layer = tiny_gpt.layers[1]
    state.advance(3, {1: 6})
    state.begin_micro_batch()
    x = torch.randn(16, 2, 32, dtype=torch.float64)
    rot = rotary_table(16, 8).double()
    out = layer(x, rotary_pos_emb=rot)
    idx = state.indices(1, 2, 16, 6, x.device)
    expected = x.clone()
    for j in range(2):
        kept = GPTBlock.forward(layer, x[idx[j], j:j + 1], rotary_pos_emb=rot[idx[j]])
        expected[idx[j], j] = kept[:, 0]
    torch.testing.assert_close(out, expected)


def test_gpt2_medium_preset_is_the_gpu_shape():
    p = e2e_step.PRESETS["gpt2-medium"]
    assert (p["num_layers"], p["hidden_size"], p["seq_length"]) == (24, 1024, 2048)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_gpu_suite_cpu_rehearsal(tmp_path):
    """``gpu_suite.sh --dry-run``: every step runs (tests, ops, e2e, report) and writes what the GPU run will."""
    env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}
    env.update(PYTHON=sys.executable, OMP_NUM_THREADS="1", SUITE_BUDGET_S="400")
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_suite.sh"), "--dry-run", str(tmp_path)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    suite = json.loads((tmp_path / "suite.json").read_text())
    status = {s["name"]: s["status"] for s in suite["steps"]}
    # a bound violation (exit 3) is the check working on tiny, noisy timings; anything else is a failure
    failed = {n: s for n, s in status.items() if s not in ("ok", "skipped", report.STATUS["3"])}
    assert not failed, (failed, (tmp_path / "suite.log").read_text()[-4000:])
    assert {"env", "info", "test_cuda", "ops", "e2e_plain"} <= set(status)
    assert suite["test_cuda"] is not None and suite["test_cuda"]["failures"] == 0
    assert len(list(tmp_path.iterdir())) <= 8  # the device tool returns at most 8 files

    e2e = json.loads((tmp_path / "e2e_step_cpu_plain.json").read_text())
    assert e2e["malloc_env_active"] is True  # the script re-executed itself under MALLOC_ENV
    assert {a["name"] for a in e2e["arms"]} >= {"full", "skip", "ltd@4", "bypass@4", "ops@4"}
    assert all(isinstance(a["minor_faults"], (int, float)) for a in e2e["arms"])
    assert e2e["errors"] == [] or all("measurement bug" in e or "(L-2)/L" in e for e in e2e["errors"])

    ops = json.loads((tmp_path / "ops_cpu.json").read_text())
    backends = {r["backend"] for r in ops["results"]}
    assert {"clone", "index_select", "index_copy_", "torch(reference)"} <= backends
    assert all(r["cold_us"] is not None for r in ops["results"] if r["op"] != "sample")
    assert {o["op"] for o in ops["overhead"]} >= {"gather", "scatter", "sample", "mask", "positions"}
    assert ops["deepspeed"] is False and "CUDA-only" in ops["deepspeed_reason"]

    table = (tmp_path / "gpu_table.md").read_text()
    assert "realized saving" in table and "cold x clone" in table
    assert "| e2e_plain | ok |" in proc.stdout


def test_depth_probe_words_track_element_zero_through_the_permutations():
    """The probe's label is where element 0 ends up: a product of the word's permutations, checked as one map."""
    import random

    from benchmarks import depth_probe

    x, y, lengths = depth_probe.words(500, random.Random(3))
    assert x.shape == (500, depth_probe.MAX_LEN + 1) and (x[:, 0] == 1).all()
    assert min(lengths) == 1 and max(lengths) == depth_probe.MAX_LEN
    for row, label, m in zip(x.tolist(), y.tolist(), lengths):
        symbols = [t - 2 for t in row[1:] if t != 0]
        assert len(symbols) == m
        composed = (0, 1, 2)  # composed[i]: where i ends up after the symbols so far
        for s in symbols:
            composed = tuple(depth_probe.GENERATORS[s][composed[i]] for i in range(3))
        assert label == composed[0]
    assert set(y.tolist()) == {0, 1, 2}
