"""DeepSpeed's own random-LTD API over ours (``random_ltd.integrations.deepspeed.compat``), with real DeepSpeed on CPU.

``engine.random_ltd_scheduler`` is checked against DeepSpeed 0.19.8's ``RandomLTDScheduler`` itself, step by step.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

import random_ltd
from random_ltd.integrations.deepspeed import compat
from random_ltd.integrations.deepspeed.helper import (
    convert_to_random_ltd,
    remove_random_ltd_state_dict,
    save_without_random_ltd,
)
from random_ltd.layers import RandomLTDLayer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
from tiny_models import Block, TinyGPT  # noqa: E402

deepspeed = pytest.importorskip("deepspeed")
from deepspeed.runtime.data_pipeline.data_routing.scheduler import RandomLTDScheduler  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("dist_env"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning"),
]

L, SEQ, VOCAB, HIDDEN, MB = 4, 32, 64, 16, 4
MIN, REQUIRE, SEQ_STEP = 8, 6, 8


def block(**extra: Any) -> dict:
    return {"enabled": True, "total_layer_num": L, "random_ltd_layer_num": 2, "random_ltd_layer_id": [1, 2],
            "model_mask_name": "attention_mask", "model_type": "decoder", "hidden_state_order": "batch_seq_dim",
            "random_ltd_schedule": {"min_value": MIN, "max_value": SEQ, "schedule_type": "fixed_linear",
                                    "schedule_config": {"require_steps": REQUIRE, "seq_per_step": SEQ_STEP}},
            **extra}


def config(enabled: bool = True, **extra: Any) -> dict:
    return {"train_micro_batch_size_per_gpu": MB, "gradient_accumulation_steps": 1,
            "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
            "zero_optimization": {"stage": 0}, "steps_per_print": 10**9,
            "data_efficiency": {"enabled": True, "seed": 1234,
                                "data_routing": {"enabled": True, "random_ltd": block(enabled=enabled)}},
            **extra}


def model(seed: int = 0) -> TinyGPT:
    torch.manual_seed(seed)
    return TinyGPT(vocab=VOCAB, hidden=HIDDEN, layers=L, seq=SEQ)


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(step)
    seq = (torch.randint(0, VOCAB, (MB, 1), generator=g) + torch.arange(SEQ + 1)) % VOCAB
    return seq[:, :-1], seq[:, 1:]


def step(engine, t: int) -> None:
    x, y = batch(t)
    engine.backward(engine(x, y))
    engine.step()


class KeptProbe:
    """The token count the body of wrapped layer 1 ran on, per training forward."""

    def __init__(self, engine) -> None:
        self.kept: list[int] = []
        engine.module.layers[1].ln1.register_forward_hook(
            lambda m, a, o: self.kept.append(a[0].shape[1]) if m.training else None)


def deepspeed_scheduler(batch_size: int) -> RandomLTDScheduler:
    """DeepSpeed's own scheduler for the same block (the engine injects global_batch_size)."""
    cfg = {**copy.deepcopy(block()), "global_batch_size": batch_size,
           "layer_token_lr_schedule": {"enabled": False}}
    return RandomLTDScheduler(cfg)


@pytest.fixture(scope="module")
def trained():
    """One engine from random_ltd.initialize, trained past full growth, with DeepSpeed's scheduler alongside."""
    m = model()
    engine, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    ds = deepspeed_scheduler(engine.train_batch_size())
    seqs = []
    for t in range(REQUIRE + 3):
        ds.update_seq(t)  # what DeepSpeed's engine does before the forward of step t
        seqs.append((engine.random_ltd_scheduler.get_current_seq(), ds.get_current_seq()))
        step(engine, t)
    return engine, ds, seqs


def test_view_follows_deepspeed_scheduler_step_by_step(trained) -> None:
    engine, ds, seqs = trained
    ours, theirs = zip(*seqs)
    assert ours == theirs and ours[0] == MIN and ours[-1] == SEQ
    view = engine.random_ltd_scheduler
    assert view.model_layer_num == ds.model_layer_num == L
    assert view.get_random_ltd_layer_num() == ds.get_random_ltd_layer_num() == 2
    assert view.global_batch_size == ds.global_batch_size == MB
    # constant batch of max_value tokens: our measured count equals DeepSpeed's formula
    assert view.state["consumed_layer_tokens"] == ds.state["consumed_layer_tokens"]
    assert {k: view.state[k] for k in ("min_value", "max_value", "schedule_type")} == \
        {k: ds.state[k] for k in ("min_value", "max_value", "schedule_type")}
    assert view.state["schedule_config"] == {"require_steps": REQUIRE, "seq_per_step": SEQ_STEP}


def test_get_total_layer_tokens_is_deepspeeds_plan_and_pure(trained) -> None:
    engine, *_ = trained
    view = engine.random_ltd_scheduler
    before = view.state_dict()
    for iters in (0, 1, REQUIRE, 50):
        assert view.get_total_layer_tokens(iters) == deepspeed_scheduler(MB).get_total_layer_tokens(iters)
    assert view.state_dict() == before  # DeepSpeed's mutates its scheduler; ours plans without side effects


def test_random_ltd_enabled_and_megatron_deepspeed_calls() -> None:
    m = model()
    engine, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    models = [engine]  # Megatron-DeepSpeed's training loop
    assert models[0].random_ltd_enabled()
    assert models[0].random_ltd_scheduler.get_random_ltd_layer_num() == 2
    m = model()
    baseline, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config(enabled=False))
    assert not baseline.random_ltd_enabled()


def test_state_mapping_keys_and_errors(trained) -> None:
    engine, *_ = trained
    state = engine.random_ltd_scheduler.state
    assert set(state) == {"consumed_layer_tokens", "current_value", "current_steps", "min_value", "max_value",
                          "schedule_type", "schedule_config"}
    assert state["current_steps"] == engine.random_ltd_schedule.step == engine.global_steps
    assert state["current_value"] == engine.random_ltd_scheduler.get_current_seq()
    with pytest.raises(KeyError, match="never stores indices"):
        state["sample_idx"]
    with pytest.raises(KeyError, match="no key 'nope'"):
        state["nope"]
    with pytest.raises(TypeError, match="read-only"):
        state["max_value"] = 7


def test_set_current_seq_holds_for_the_step_and_is_counted() -> None:
    m = model()
    engine, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    probe = KeptProbe(engine)
    view = engine.random_ltd_scheduler
    step(engine, 0)
    view.set_current_seq(24)
    assert view.get_current_seq() == 24
    step(engine, 1)  # DeepSpeed's forward prologue calls update_seq(global_steps): the override stays
    step(engine, 2)  # the schedule advanced: back to its own value
    view.state["current_value"] = 16  # the state form of set_current_seq
    step(engine, 3)
    assert probe.kept == [8, 24, 16, 16]
    with pytest.raises(ValueError, match="seq_length"):
        view.set_current_seq(0)
    expected = sum(MB * (2 * SEQ + 2 * k) for k in probe.kept)
    assert view.state["consumed_layer_tokens"] == expected


def test_update_seq_other_step_sets_that_steps_length() -> None:
    m = model()
    engine, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    probe = KeptProbe(engine)
    view = engine.random_ltd_scheduler
    view.update_seq(0)  # the engine's own step: nothing changes
    assert view.get_current_seq() == MIN
    view.update_seq(REQUIRE)  # DeepSpeed's meaning: the value at that step
    assert view.get_current_seq() == SEQ
    step(engine, 0)
    step(engine, 1)
    assert probe.kept == [SEQ, MIN]


def test_state_dict_round_trip_and_refusals(trained, tmp_path) -> None:
    engine, *_ = trained
    sd = engine.random_ltd_scheduler.state_dict()
    assert {"consumed_layer_tokens", "current_steps", "current_value", "min_value", "max_value"} <= set(sd)
    json.dumps(sd)  # plain types
    m = model(1)
    fresh, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    fresh.random_ltd_scheduler.load_state_dict(None)  # a checkpoint without random-LTD: nothing changes
    assert fresh.random_ltd_schedule.step == 0
    fresh.random_ltd_scheduler.load_state_dict(sd)
    assert fresh.random_ltd_scheduler.state_dict() == sd
    assert fresh.random_ltd_state.kept_lengths == engine.random_ltd_state.kept_lengths
    with pytest.raises(ValueError, match="DeepSpeed's own random-LTD"):
        fresh.random_ltd_scheduler.load_state_dict(deepspeed_scheduler(MB).state_dict())


def test_deepspeed_checkpoint_holds_the_view_state(tmp_path) -> None:
    """DeepSpeed's save_checkpoint stores random_ltd_scheduler.state_dict() as checkpoint['random_ltd'] now that
    random_ltd_enabled() is true; loading restores the schedule from it."""
    m = model()
    engine, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    for t in range(3):
        step(engine, t)
    engine.save_checkpoint(str(tmp_path), tag="t")
    saved = torch.load(tmp_path / "t" / "mp_rank_00_model_states.pt", weights_only=False)
    assert saved["random_ltd"] == engine.random_ltd_scheduler.state_dict()
    m = model(1)
    resumed, *_ = random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config())
    resumed.load_checkpoint(str(tmp_path), tag="t")
    assert resumed.random_ltd_scheduler.state_dict() == engine.random_ltd_scheduler.state_dict()


def test_convert_after_deepspeed_initialize_with_layer_token_lr_replaces_client_scheduler(tmp_path, caplog) -> None:
    """DeepSpeed's call form with the LayerTokenLR scheduler block: the client's scheduler is replaced (warning)."""
    cfg = config(scheduler={"type": "LayerTokenLR", "params": {"total_layer_tokens": 10**6,
                                                                "warmup_layer_tokens": 10**4}})
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=1e-3)
    client = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    engine, _, _, sched = deepspeed.initialize(model=m, optimizer=opt, lr_scheduler=client, config=cfg)
    assert sched is client
    with caplog.at_level(logging.WARNING, logger="random_ltd"):
        assert convert_to_random_ltd(engine, Block) is engine
    assert any("replaces the lr_scheduler passed" in r.getMessage() for r in caplog.records)
    assert isinstance(engine.lr_scheduler, random_ltd.LayerTokenLR)
    probe = KeptProbe(engine)
    lrs = []
    for t in range(3):
        step(engine, t)
        lrs.append(opt.param_groups[0]["lr"])
    assert probe.kept == [MIN, MIN, 16]
    assert 0 < lrs[0] < lrs[1] < lrs[2] <= 1e-3  # layer-token warmup, not the client's constant
    assert convert_to_random_ltd(engine, Block) is engine  # a second call changes nothing


def test_convert_reads_a_config_path_and_plain_models(tmp_path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config()))
    m = model()
    assert convert_to_random_ltd(m, Block, str(path)) is m  # a plain module: layers wrapped, model returned
    assert [isinstance(layer, RandomLTDLayer) for layer in m.layers] == [False, True, True, False]
    m2 = model()
    state = random_ltd.convert_to_random_ltd(m2, Block, str(path))  # the layer-level call takes a path too
    assert state.total_layers == L and isinstance(m2.layers[1], RandomLTDLayer)
    # and a wrong config names the key
    bad = config()
    bad["data_efficiency"]["data_routing"]["random_ltd"]["total_layer_num"] = 6
    path.write_text(json.dumps(bad))
    with pytest.raises(ValueError, match="total_layer_num"):
        random_ltd.convert_to_random_ltd(model(), Block, path)


def test_save_without_random_ltd_and_remove_random_ltd_state_dict(trained) -> None:
    engine, *_ = trained
    plain = model(5)
    plain.load_state_dict(save_without_random_ltd(engine), strict=True)
    assert list(save_without_random_ltd(engine.module)) == list(plain.state_dict())
    ds_style = {"layers.1.random_ltd_layer.ln1.weight": 1, "head.bias": 2}
    assert dict(remove_random_ltd_state_dict(ds_style)) == {"layers.1.ln1.weight": 1, "head.bias": 2}
    assert compat.remove_random_ltd_state_dict is remove_random_ltd_state_dict
