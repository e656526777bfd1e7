"""Checkpoints of the engine ``random_ltd.initialize`` returns (real DeepSpeed on CPU, one process): a tag is never
rewritten, ``latest`` only ever names a complete tag, missing checkpoints are clear errors, and checkpoints without
random-LTD (or LayerToken LR) state resume at the engine's global step instead of restarting the schedule.

The two-process kills (mid-shard, mid-step, launcher death) are in tests/launch/test_fault_injection.py."""

from __future__ import annotations

import hashlib
import logging
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_deepspeed_engine import (  # noqa: E402
    EXPECTED_KEPT,
    MB,
    SEQ,
    KeptProbe,
    L,
    hand_layer_tokens,
    init,
    lr_block_form,
    make_config,
    make_model,
    train,
)

from random_ltd.integrations.deepspeed.checkpoint import (  # noqa: E402
    INCOMPLETE_SUFFIX,
    CheckpointNotFoundError,
    resolve_load_tag,
    write_latest,
)

deepspeed = pytest.importorskip("deepspeed")

pytestmark = [
    pytest.mark.usefixtures("dist_env"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning"),
]


def digest(tag_dir: Path) -> dict[str, str]:
    """sha256 of every file under a tag directory (to prove it was not rewritten)."""
    return {str(p.relative_to(tag_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(tag_dir.rglob("*")) if p.is_file()}


# ---- item 9: never rewrite a complete tag --------------------------------------------------------------------------


def test_saving_an_existing_tag_is_refused_and_the_tag_left_intact(tmp_path) -> None:
    engine, *_ = init(make_model(), make_config())
    train(engine, 2)
    engine.save_checkpoint(str(tmp_path))  # tag global_step2
    before = digest(tmp_path / "global_step2")
    assert before and (tmp_path / "latest").read_text() == "global_step2"
    with pytest.raises(FileExistsError, match="global_step2 already exists"):
        engine.save_checkpoint(str(tmp_path))  # the same step again (launch/megatron_train.py's final save)
    train(engine, 1)
    engine.save_checkpoint(str(tmp_path), tag="mine")
    with pytest.raises(FileExistsError, match="mine already exists"):
        engine.save_checkpoint(str(tmp_path), tag="mine")
    assert digest(tmp_path / "global_step2") == before
    assert (tmp_path / "latest").read_text() == "mine"
    assert not list(tmp_path.glob(f"*{INCOMPLETE_SUFFIX}"))


@pytest.mark.parametrize("tag", ["a/b", "..", f"x{INCOMPLETE_SUFFIX}"])
def test_bad_tag_names_are_value_errors(tmp_path, tag: str) -> None:
    engine, *_ = init(make_model(), make_config())
    with pytest.raises(ValueError, match="tag"):
        engine.save_checkpoint(str(tmp_path), tag=tag)


# ---- item 10: `latest` only after every shard; a crashed save publishes nothing ------------------------------------


class Crash(Exception):
    pass


def test_a_save_that_dies_mid_shard_publishes_nothing(tmp_path, monkeypatch) -> None:
    engine, *_ = init(make_model(), make_config(zero=1))
    train(engine, 2)
    engine.save_checkpoint(str(tmp_path))
    good = digest(tmp_path / "global_step2")
    train(engine, 2)

    real_save = engine.checkpoint_engine.save

    def dies_mid_shard(state_dict, path):
        if "optim_states" in str(path):  # the ZeRO shard: half written, then the "kill"
            real_save(state_dict, path)
            with open(path, "r+b") as f:
                f.truncate(Path(path).stat().st_size // 2)
            raise Crash(path)
        return real_save(state_dict, path)

    monkeypatch.setattr(engine.checkpoint_engine, "save", dies_mid_shard)
    with pytest.raises(Crash):
        engine.save_checkpoint(str(tmp_path))
    assert (tmp_path / "latest").read_text() == "global_step2"
    assert not (tmp_path / "global_step4").exists()  # DeepSpeed leaves a half-written global_step4 here
    assert (tmp_path / f"global_step4{INCOMPLETE_SUFFIX}").is_dir()
    assert digest(tmp_path / "global_step2") == good

    monkeypatch.setattr(engine.checkpoint_engine, "save", real_save)
    engine.save_checkpoint(str(tmp_path))  # the leftover is removed and the tag written whole
    assert not (tmp_path / f"global_step4{INCOMPLETE_SUFFIX}").exists()
    assert (tmp_path / "latest").read_text() == "global_step4"
    resumed, *_ = init(make_model(seed=5), make_config(zero=1))
    path, _ = resumed.load_checkpoint(str(tmp_path))
    assert path is not None and resumed.global_steps == 4 and resumed.random_ltd_schedule.step == 4


def test_write_latest_is_atomic_replace(tmp_path) -> None:
    (tmp_path / "latest").write_text("old")
    write_latest(tmp_path, "new")
    assert (tmp_path / "latest").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]  # no temp file left behind


# ---- item 11: a checkpoint asked for and not there is an error -----------------------------------------------------


def test_missing_tags_are_clear_errors(tmp_path) -> None:
    engine, *_ = init(make_model(), make_config())
    train(engine, 1)
    engine.save_checkpoint(str(tmp_path))
    fresh, *_ = init(make_model(), make_config())
    with pytest.raises(CheckpointNotFoundError, match="'nope' .*does not exist.*global_step1"):
        fresh.load_checkpoint(str(tmp_path), tag="nope")
    (tmp_path / "latest").write_text("global_step99")
    with pytest.raises(CheckpointNotFoundError, match="global_step99.*named by .*latest.*does not exist"):
        fresh.load_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text(f"global_step1{INCOMPLETE_SUFFIX}")
    with pytest.raises(CheckpointNotFoundError, match="unfinished save"):
        fresh.load_checkpoint(str(tmp_path))
    (tmp_path / "latest").write_text("")
    with pytest.raises(CheckpointNotFoundError, match="empty"):
        fresh.load_checkpoint(str(tmp_path))
    assert isinstance(CheckpointNotFoundError("x"), FileNotFoundError)
    assert fresh.random_ltd_schedule.step == 0 and fresh.global_steps == 0  # nothing half-loaded


def test_no_latest_returns_none_like_deepspeed(tmp_path) -> None:
    """DeepSpeed's documented contract (load_path None: nothing loaded) is kept; entry points turn it into an error."""
    engine, *_ = init(make_model(), make_config())
    assert engine.load_checkpoint(str(tmp_path / "missing")) == (None, None)
    assert engine.load_checkpoint(str(tmp_path)) == (None, None)
    assert resolve_load_tag(tmp_path) is None


# ---- item 12: no silent mix of continued weights and a restarted schedule ------------------------------------------


def _records(engine, steps: int, first_step: int) -> tuple[list, list]:
    probe = KeptProbe(engine)
    history = train(engine, steps, first_step=first_step)
    probe.handle.remove()
    return history, probe.records


def test_checkpoint_without_random_ltd_state_resumes_at_the_global_step(tmp_path, caplog) -> None:
    steps, k = 6, 3
    cfg = lr_block_form()
    engine, *_ = init(make_model(), cfg)
    full_hist, full_kept = _records(engine, steps, 0)

    first, *_ = init(make_model(), cfg)
    train(first, k)
    # what plain DeepSpeed writes: the same weights, optimizer, LR and global step, no random-LTD client state
    deepspeed.DeepSpeedEngine.save_checkpoint(first, str(tmp_path), tag="plain")

    resumed, *_ = init(make_model(seed=99), cfg)
    with caplog.at_level(logging.WARNING, logger="random_ltd"):
        path, client = resumed.load_checkpoint(str(tmp_path), tag="plain")
    assert path is not None
    assert "no random-LTD state" in caplog.text and "rebuilt from the engine's global step 3" in caplog.text
    sched = resumed.random_ltd_schedule
    assert sched.step == resumed.random_ltd_state.step == k
    assert resumed.random_ltd_state.kept_lengths == {1: EXPECTED_KEPT[k], 2: EXPECTED_KEPT[k]}
    assert sched.consumed_layer_tokens == sum(hand_layer_tokens(kept, MB)[0] for kept in EXPECTED_KEPT[:k])
    assert sched.baseline_layer_tokens == k * MB * L * SEQ
    assert (sched.consumed_samples, sched.consumed_tokens) == (k * MB, k * MB * SEQ)
    hist_b, kept_b = _records(resumed, steps - k, k)
    assert hist_b == full_hist[k:]  # LR and losses continue bit for bit
    assert kept_b == full_kept[k:]


@pytest.mark.parametrize("scheduler", [None, {"type": "WarmupDecayLR", "params": {
    "warmup_min_lr": 0, "warmup_max_lr": 1e-3, "warmup_num_steps": 2, "total_num_steps": 20}}],
    ids=["no_scheduler", "warmup_decay"])
def test_random_ltd_resumes_from_a_baseline_checkpoint(tmp_path, caplog, scheduler) -> None:
    k = 3
    extra = {} if scheduler is None else {"scheduler": scheduler}
    base, *_ = init(make_model(), make_config(enabled=False, **extra))
    assert (base.lr_scheduler is None) == (scheduler is None)
    train(base, k)
    base.save_checkpoint(str(tmp_path))

    resumed, *_ = init(make_model(seed=7), lr_block_form())
    with caplog.at_level(logging.WARNING, logger="random_ltd"):
        with pytest.warns(UserWarning, match="different schedule config"):
            path, _ = resumed.load_checkpoint(str(tmp_path))  # KeyError / TypeError before
    assert path is not None and "LayerToken LR was rebuilt" in caplog.text
    sched = resumed.random_ltd_schedule
    assert sched.step == k and resumed.random_ltd_state.kept_lengths == {1: EXPECTED_KEPT[k], 2: EXPECTED_KEPT[k]}
    assert sched.consumed_layer_tokens == k * MB * L * SEQ  # what the baseline really consumed
    lr = resumed.lr_scheduler
    assert lr.consumed_layer_tokens == sched.consumed_layer_tokens
    assert resumed.optimizer.param_groups[0]["lr"] == pytest.approx(lr.lr_at(sched.consumed_layer_tokens)[0])
    for got, want in zip(resumed.module.parameters(), base.module.parameters()):
        assert torch.equal(got, want)
    hist = train(resumed, 1, first_step=k)
    assert hist[0]["lr"] == pytest.approx(lr.lr_at(k * MB * L * SEQ)[0])
