"""Ablation options and runner: named layer sets, the constant schedule at MSLG's saving, every arm end to end."""

from __future__ import annotations

import json
import math
import socket
import sys
from pathlib import Path

import pytest

from random_ltd import ConfigError, MSLGSchedule, RandomLTDConfig
from random_ltd.config import layer_set_ids
from random_ltd.schedules import planned_layer_tokens, total_saving

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from launch import ablations  # noqa: E402

pytestmark = [pytest.mark.filterwarnings("ignore::DeprecationWarning"),
              pytest.mark.filterwarnings("ignore::FutureWarning"),
              pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning")]

RECIPE = json.loads((ROOT / "configs" / "tiny_gpt_cpu.json").read_text())


# ---- layer_set ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,expected", [("all", [0, 1, 2, 3, 4]), ("all_but_first", [1, 2, 3, 4]),
                                           ("all_but_last", [0, 1, 2, 3]), ("all_but_first_and_last", [1, 2, 3]),
                                           ("sandwich", [1, 2, 3])])
def test_layer_set_resolves_layer_ids(name, expected):
    cfg = RandomLTDConfig.model_validate({"total_layer_num": 5, "layer_set": name})
    assert cfg.random_ltd_layer_id == expected and cfg.random_ltd_layer_num == len(expected)
    assert layer_set_ids(name, 5) == expected
    # the same list given explicitly is accepted; the layer count drives the planned layer-tokens
    again = RandomLTDConfig.model_validate({"total_layer_num": 5, "layer_set": name,
                                            "random_ltd_layer_id": list(reversed(expected))})
    assert again.layer_ids == tuple(expected)


def test_layer_set_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"random_ltd\.layer_set: unknown layer_set 'first'; allowed: all"):
        RandomLTDConfig.model_validate({"total_layer_num": 5, "layer_set": "first"})
    with pytest.raises(ConfigError, match=r"random_ltd\.random_ltd_layer_id: \[1\] disagrees with layer_set 'all'"):
        RandomLTDConfig.model_validate({"total_layer_num": 5, "layer_set": "all", "random_ltd_layer_id": [1]})
    with pytest.raises(ConfigError, match=r"random_ltd\.layer_set: 'all' needs total_layer_num"):
        RandomLTDConfig.model_validate({"layer_set": "all"})
    with pytest.raises(ConfigError, match=r"layer_set: layer_set 'sandwich' is empty for total_layer_num 2"):
        RandomLTDConfig.model_validate({"total_layer_num": 2, "layer_set": "sandwich"})
    with pytest.raises(ConfigError, match=r"random_ltd_layer_num: 6 != len\(random_ltd_layer_id\) 8"):
        RandomLTDConfig.model_validate({"total_layer_num": 8, "layer_set": "all", "random_ltd_layer_num": 6})
    with pytest.raises(ConfigError, match="layer_set"):
        RandomLTDConfig.model_validate({"total_layer_num": 5, "layer_set": 3})


def test_layer_set_counts_layer_tokens():
    """'all' drops in every layer: the planned layer-tokens use every layer's kept length."""
    sched = {"min_value": 32, "max_value": 64, "schedule_type": "constant"}
    cfg = RandomLTDConfig.model_validate({"enabled": True, "total_layer_num": 4, "layer_set": "all",
                                          "random_ltd_schedule": sched})
    assert planned_layer_tokens(cfg, 3, 2, 64) == (3 * 2 * 4 * 32, 3 * 2 * 4 * 64)
    cfg = cfg.model_copy(update={"random_ltd_layer_id": [1, 2], "random_ltd_layer_num": 2})
    assert MSLGSchedule(cfg).layer_tokens(0, 2, 64) == 2 * (2 * 32 + 2 * 64)


# ---- constant schedule at MSLG's saving ---------------------------------------------------------------------------


@pytest.mark.parametrize("steps,seq,layer_set", [(200, 256, "all_but_first_and_last"), (200, 128, "all"),
                                                 (60, 128, "all_but_first"), (1000, 512, "sandwich")])
def test_constant_matches_mslg_saving_within_one_percent(steps, seq, layer_set):
    s = ablations.Settings(steps=steps, seq_length=seq)
    base = ablations.scaled_recipe(RECIPE, s)
    mslg = ablations.arm_config(base, ablations.Arm("m", layer_set=layer_set), s)
    const = ablations.arm_config(base, ablations.Arm("c", layer_set=layer_set, kept="match"), s)
    c_cfg = RandomLTDConfig.from_deepspeed(const)
    m_cfg = RandomLTDConfig.from_deepspeed(mslg)
    assert c_cfg.random_ltd_schedule.schedule_type == "constant"
    assert c_cfg.layer_ids == m_cfg.layer_ids == tuple(layer_set_ids(layer_set, 8))
    m_consumed, base_tokens = planned_layer_tokens(m_cfg, steps, s.batch, seq)
    c_consumed, c_base = planned_layer_tokens(c_cfg, steps, s.batch, seq)
    assert c_base == base_tokens
    assert abs(c_consumed - m_consumed) / m_consumed < 0.01  # requested LayerToken budget within 1%
    m_saving, c_saving = total_saving(m_cfg, steps, s.batch, seq), total_saving(c_cfg, steps, s.batch, seq)
    assert m_saving > 0.1 and abs(c_saving - m_saving) < 0.01 * m_saving
    # and the nearest integer: one token more or less is farther from the target
    k = c_cfg.random_ltd_schedule.min_value
    for other in (k - 1, k + 1):
        trial = RandomLTDConfig.from_deepspeed(ablations._with_constant(const, other))
        assert abs(total_saving(trial, steps, s.batch, seq) - m_saving) >= abs(c_saving - m_saving)
    ten_less = RandomLTDConfig.from_deepspeed(
        ablations.arm_config(base, ablations.Arm("c", layer_set=layer_set, kept="match-10"), s))
    assert abs(total_saving(ten_less, steps, s.batch, seq) - (m_saving - 0.10)) < 0.01


def test_arm_configs_follow_the_study_design():
    s = ablations.Settings(steps=200, seq_length=256)
    base = ablations.scaled_recipe(RECIPE, s)
    # the scaled recipe at the recipe's own size is the recipe (LayerToken LR budget included)
    default = ablations.arm_config(base, ablations.DEFAULT, s)
    block = default["data_efficiency"]["data_routing"]["random_ltd"]
    recipe_block = RECIPE["data_efficiency"]["data_routing"]["random_ltd"]
    assert block["layer_token_lr_schedule"] == recipe_block["layer_token_lr_schedule"]
    assert block["random_ltd_schedule"] == recipe_block["random_ltd_schedule"]
    arms = {a.name: a for a in ablations.study_arms("tokenbypass")}
    cfgs = {n: RandomLTDConfig.from_deepspeed(ablations.arm_config(base, a, s)) for n, a in arms.items()}
    r1, t1 = cfgs["set 1: random-LTD (sandwich, const s/2)"], cfgs["set 1: TokenBypass (sandwich, const s/2)"]
    assert r1.layer_ids == t1.layer_ids == (3, 4, 5, 6) and t1.token_bypass.enabled and not r1.token_bypass.enabled
    assert t1.token_bypass.special_token_ids == [10] and t1.random_ltd_schedule.min_value == 128
    r2 = cfgs["set 2: random-LTD (layers 1..L-2, const s/2)"]
    assert r2.layer_ids == tuple(range(1, 7))
    assert not cfgs["baseline"].enabled
    it = ablations.arm_config(base, ablations.study_arms("lr")[1], s)
    assert it["scheduler"]["type"] == "WarmupDecayLR"
    assert not it["data_efficiency"]["data_routing"]["random_ltd"]["layer_token_lr_schedule"]["enabled"]
    with pytest.raises(ValueError, match="study must be one of"):
        ablations.study_arms("dropout")


# ---- every arm end to end -----------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_every_arm_runs_end_to_end(tmp_path, monkeypatch):
    """All four studies through random_ltd.initialize (DeepSpeed engine on CPU) at a tiny size, via the CLI."""
    for key, value in {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0",
                       "WORLD_SIZE": "1", "LOCAL_RANK": "0"}.items():
        monkeypatch.setenv(key, value)
    report = ablations.main(["--study", "all", "--steps", "3", "--seq-length", "32", "--num-layers", "4",
                             "--hidden-size", "16", "--num-attention-heads", "2", "--batch", "2",
                             "--eval-iters", "1", "--eval-interval", "3", "--out", str(tmp_path)])
    assert set(report["studies"]) == set(ablations.STUDIES)
    for study, v in report["studies"].items():
        assert [r["arm"] for r in v["rows"]] == [a.name for a in ablations.study_arms(study)]
        for row in v["rows"]:
            assert math.isfinite(row["final_val_loss"]) and row["final_val_loss"] < 10
            run = v["runs"][row["arm"]][0]
            assert [p["step"] for p in run["curve"]] == [0, 3]
            assert run["consumed_layer_tokens"] == row["consumed_layer_tokens"]
            assert run["baseline_layer_tokens"] == 3 * 2 * 32 * 4
        assert (tmp_path / f"{study}_val_loss_vs_layer_tokens.png").stat().st_size > 0
    rows = {r["arm"]: r for r in report["studies"]["tokenbypass"]["rows"]}
    # equal saving inside each set: constant s/2 on the same layers
    assert rows["set 1: random-LTD (sandwich, const s/2)"]["consumed_layer_tokens"] == \
        rows["set 1: TokenBypass (sandwich, const s/2)"]["consumed_layer_tokens"] == 3 * 2 * (2 * 32 + 2 * 16)
    assert rows["set 2: TokenBypass (layers 1..L-2, const s/2)"]["saved_percent"] == pytest.approx(25.0)
    assert rows["baseline"]["saved_percent"] == 0.0
    # TokenBypass and random selection trained differently (the selection is not random)
    assert rows["set 1: random-LTD (sandwich, const s/2)"]["final_val_loss"] != \
        rows["set 1: TokenBypass (sandwich, const s/2)"]["final_val_loss"]
    layers = {r["arm"]: r for r in report["studies"]["layers"]["rows"]}
    assert layers["all layers"]["consumed_layer_tokens"] < layers["all but first"]["consumed_layer_tokens"] < \
        layers["all but first and last"]["consumed_layer_tokens"]
    md = (tmp_path / "results.md").read_text()
    assert md.count("| baseline |") == 4 and "### schedule" in md
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["settings"]["steps"] == 3
