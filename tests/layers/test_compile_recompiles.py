"""torch.compile over a whole MSLG schedule: the kept length grows every few steps, the compiled model must not
recompile at every new length (nor at every step). Counted with torch._dynamo's frame counter, backend "eager"
(dynamo's guards and recompiles are what is measured; no inductor code generation needed)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import random_ltd
from random_ltd import MSLGSchedule, RandomLTDConfig

sys.path.insert(0, str(Path(__file__).resolve().parent))
from tiny_models import TinyGPT  # noqa: E402

L = 4


def compiled_frames_per_step(make_model, make_batch, seq: int, growth_steps: int) -> tuple[list[int], list[int]]:
    """(frames compiled at each optimizer step, kept length of each step) over a schedule min 8 -> seq by 8s."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    cfg = RandomLTDConfig.model_validate({
        "enabled": True, "total_layer_num": L, "hidden_state_order": "batch_seq_dim",
        "random_ltd_schedule": {"min_value": 8, "max_value": seq,
                                "schedule_config": {"require_steps": growth_steps, "seq_per_step": 8}}})
    model = make_model()
    state = random_ltd.convert_to_random_ltd(model, config=cfg)
    sched = MSLGSchedule(cfg)
    compiled = torch.compile(model, backend="eager")
    frames, kept = [], []
    # a high recompile limit: growth must show, not hide behind dynamo's fallback to eager at the limit
    with torch._dynamo.config.patch(recompile_limit=1000, accumulated_recompile_limit=10000):
        for step in range(growth_steps + 2):
            state.advance(step, sched.layer_kept_lengths(step))
            before = counters["frames"]["total"]
            make_batch(compiled, seq).backward()
            state.finish_step()
            frames.append(counters["frames"]["total"] - before)
            kept.append(sched.kept_length(step))
    torch._dynamo.reset()
    return frames, kept


def tiny_gpt() -> TinyGPT:
    torch.manual_seed(0)
    return TinyGPT(vocab=64, hidden=16, layers=L, seq=128)


def tiny_gpt_loss(model, seq: int) -> torch.Tensor:
    x = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    return model(x, x)


def hf_gpt2():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(vocab_size=64, n_positions=128, n_embd=16, n_layer=L, n_head=2, resid_pdrop=0.0,
                                  embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, bos_token_id=0, eos_token_id=0)
    return transformers.GPT2LMHeadModel(cfg).train()


def hf_gpt2_loss(model, seq: int) -> torch.Tensor:
    x = torch.randint(0, 64, (2, seq), generator=torch.Generator().manual_seed(0))
    return model(input_ids=x, labels=x).loss


@pytest.mark.parametrize("make_model,make_batch", [(tiny_gpt, tiny_gpt_loss), (hf_gpt2, hf_gpt2_loss)],
                         ids=["random_ltd_layer", "hf_adapter"])
def test_recompiles_stay_a_small_constant_over_the_schedule(make_model, make_batch) -> None:
    short, kept_short = compiled_frames_per_step(make_model, make_batch, seq=64, growth_steps=14)
    long, kept_long = compiled_frames_per_step(make_model, make_batch, seq=128, growth_steps=30)
    assert len(set(kept_short)) == 8 and len(set(kept_long)) == 16
    # after the second distinct kept length (dynamo then makes the length dynamic) nothing compiles any more, but
    # once for the full length (no dropping: another code path)
    third, full = kept_long.index(sorted(set(kept_long))[2]), kept_long.index(128)
    assert sum(n for t, n in enumerate(long[third:], third) if t != full) == 0, list(zip(kept_long, long))
    # and the recompiles (frames compiled after the first step) do not grow with the number of distinct lengths
    assert sum(long[1:]) == sum(short[1:]) <= 16, (short, long)
