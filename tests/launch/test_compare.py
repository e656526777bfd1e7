"""launch/compare.py's design without training: planned budgets, rescaled MSLG, LayerToken LR totals, the per-arm
LR sweep, dropout on the command line, and the statistics under the table (a fake runner stands in for training)."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from launch import compare
from random_ltd.config import RandomLTDConfig, layer_token_lr_config_from_deepspeed
from random_ltd.schedules import planned_layer_tokens

ROOT = Path(__file__).resolve().parents[2]
RECIPE = json.loads((ROOT / "configs" / "tiny_gpt_cpu.json").read_text())


@pytest.fixture(scope="module")
def planner() -> compare.Planner:
    return compare.Planner(RECIPE, train_iters=200, seq_len=256, num_layers=8)


def _block(ds: dict) -> dict:
    return ds["data_efficiency"]["data_routing"]["random_ltd"]


def test_equal_steps_arm_is_the_recipe(planner) -> None:
    ds = planner.config(True, 200)
    assert _block(ds)["random_ltd_schedule"] == _block(RECIPE)["random_ltd_schedule"]
    lr = layer_token_lr_config_from_deepspeed(ds)
    assert lr.total_layer_tokens == _block(RECIPE)["layer_token_lr_schedule"]["total_layer_tokens"] == 4456960
    assert lr.warmup_layer_tokens == 256 * 8 * 16 * 20  # eq. 1
    assert planner.planned(ds, 200) == 4456960


@pytest.mark.parametrize("arm", ["random-ltd-budget", "random-ltd-2/3"])
def test_budget_arms_rescale_mslg_and_decay_over_their_own_consumption(planner, arm: str) -> None:
    dropping, budget = compare.ARMS[arm]
    steps = planner.steps_for(dropping, budget)
    ds = planner.config(dropping, steps)
    target = budget * 200 * 16 * 256 * 8
    consumed = planner.planned(ds, steps)
    # the plan of the chosen length is the closest to the budget: within one step's layer-tokens
    assert abs(consumed - target) <= 16 * 256 * 8
    # MSLG reaches full length at the recipe's fraction of the arm's own length (170/200 = 0.85)
    assert _block(ds)["random_ltd_schedule"]["schedule_config"]["require_steps"] == round(0.85 * steps)
    lr = layer_token_lr_config_from_deepspeed(ds)
    cfg = RandomLTDConfig.from_deepspeed(ds)
    assert lr.total_layer_tokens == planned_layer_tokens(cfg, steps, 16, 256)[0] == consumed
    assert ds["scheduler"]["params"]["total_num_steps"] == steps
    # the recipe itself saves ~32% per step, so the budget arm runs longer than the baseline
    assert (steps > 200) == (budget == 1.0)


def test_baseline_arms(planner) -> None:
    assert planner.steps_for(False, None) == 200 and planner.steps_for(False, 1.5) == 300
    ds = planner.config(False, 300, lr=1e-3, warmup=30)
    assert not _block(ds)["enabled"] and not _block(ds)["layer_token_lr_schedule"]["enabled"]
    p = ds["scheduler"]["params"]
    assert (p["total_num_steps"], p["warmup_num_steps"], p["warmup_max_lr"], ds["optimizer"]["params"]["lr"]) == (
        300, 30, 1e-3, 1e-3)
    assert planner.planned(ds, 300) == 300 * 16 * 256 * 8


def _fake_runner(calls: list):
    def run(name, seed, ds, steps, args, tag="", lr_source=None):
        calls.append((name, seed, tag, steps, lr_source))
        lr = ds["optimizer"]["params"]["lr"]
        # a fake loss: best at lr 2e-3 for random-LTD arms and 4e-3 for baselines; seeds add spread
        best = 2e-3 if _block(ds).get("enabled") else 4e-3
        loss = 1.8 + 50 * abs(lr - best) + 0.001 * (seed % 7) - (0.1 if name == "random-ltd-budget" else 0.0)
        consumed = compare.Planner(ds, train_iters=steps, seq_len=256, num_layers=8).planned(ds, steps)
        return {"arm": name, "steps": steps, "final_val_loss": loss, "consumed_layer_tokens": consumed,
                "wall_s": 1.0, "curve": []}
    return run


def test_paper_design_sweeps_each_arm_and_tests_the_claims(tmp_path) -> None:
    calls: list = []
    summary = compare.main(["--design", "paper", "--seeds", "3", "--lr-grid", "1e-3,2e-3,4e-3", "--out",
                            str(tmp_path)], runner=_fake_runner(calls))
    arms = compare.PAPER_ARMS
    # 3 sweep runs per arm on the sweep seed (not the LR replay, which takes random-ltd's pick), then 3 reported
    # seeds per arm at the arm's best LR
    assert sum(1 for c in calls if c[1] == 999) == 3 * (len(arms) - len(compare.LR_OF))
    assert sorted({c[1] for c in calls}) == [999, 1234, 1235, 1236]
    for arm in arms:
        dropping = compare.ARMS[arm][0] or arm in compare.LR_OF
        assert summary["settings"][arm]["lr"] == (2e-3 if dropping else 4e-3)
        assert len(summary["results"][arm]) == 3
    claimed = {(c["a"], c["b"]) for c in summary["comparisons"]}
    assert claimed == set(compare.CLAIMS)
    budget = next(c for c in summary["comparisons"] if c["a"] == "random-ltd-budget" and c["b"] == "baseline")
    assert budget["diff"] == pytest.approx(-0.1, abs=1e-9) and budget["p"] < 0.05
    text = (tmp_path / "table.md").read_text()
    assert "Welch's t-test" in text and "random-ltd-budget − baseline-1.5x" in text and "± " in text
    assert summary["dropout"] == 0.1


def test_default_is_the_quick_demo(tmp_path) -> None:
    calls: list = []
    summary = compare.main(["--out", str(tmp_path)], runner=_fake_runner(calls))
    assert [c[0] for c in calls] == ["baseline", "random-ltd"] and summary["comparisons"] == []
    assert "fewer than 2 seeds: no tests" in (tmp_path / "table.md").read_text()


def test_bad_arguments(tmp_path) -> None:
    with pytest.raises(SystemExit, match="unknown"):
        compare.main(["--arms", "baseline,foo", "--out", str(tmp_path)], runner=_fake_runner([]))
    with pytest.raises(SystemExit, match="--num-layers 6 != the config's total_layer_num 8"):
        compare.main(["--num-layers", "6", "--out", str(tmp_path)], runner=_fake_runner([]))
    with pytest.raises(SystemExit, match="comma-separated"):
        compare.main(["--lr-grid", "1e-3,x", "--out", str(tmp_path)], runner=_fake_runner([]))
    bare = tmp_path / "bare.json"
    bare.write_text(json.dumps({k: v for k, v in RECIPE.items() if k != "scheduler"}))
    with pytest.raises(SystemExit, match="--warmup-grid: the config has no 'scheduler' block"):
        compare.main(["--deepspeed_config", str(bare), "--warmup-grid", "5,10", "--out", str(tmp_path)],
                     runner=_fake_runner([]))


def test_run_arm_passes_dropout_and_the_arm_config(tmp_path, monkeypatch) -> None:
    seen = {}

    def fake_run(cmd, env, check, cwd):
        seen["cmd"] = cmd
        out = Path(cmd[cmd.index("--results") + 1])
        out.write_text(json.dumps({"steps": 3, "final_val_loss": 2.0, "consumed_layer_tokens": 1, "wall_s": 1.0,
                                   "curve": []}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    args = compare.parse_args(["--out", str(tmp_path), "--dropout", "0.1"])
    args.seq_length, args.num_layers = 256, 8
    planner = compare.Planner(RECIPE, train_iters=200, seq_len=256, num_layers=8)
    compare.run_arm("baseline-1.5x", 1234, planner.config(False, 300), 300, args)
    cmd = seen["cmd"]
    assert cmd[cmd.index("--hidden-dropout") + 1] == "0.1" and cmd[cmd.index("--attention-dropout") + 1] == "0.1"
    assert "--baseline" in cmd and cmd[cmd.index("--train-iters") + 1] == "300"
    written = json.loads(Path(cmd[cmd.index("--deepspeed_config") + 1]).read_text())
    assert written["scheduler"]["params"]["total_num_steps"] == 300


def test_recipe_without_a_scheduler_gets_none() -> None:
    recipe = {k: v for k, v in RECIPE.items() if k != "scheduler"}
    p = compare.Planner(recipe, train_iters=200, seq_len=256, num_layers=8)
    assert "scheduler" not in p.config(False, 300, lr=1e-3, warmup=5)
    ds = p.config(True, 200, lr=1e-3)
    assert "scheduler" not in ds and ds["optimizer"]["params"]["lr"] == 1e-3
    assert layer_token_lr_config_from_deepspeed(ds).warmup_layer_tokens == 0


def test_resume_reuses_only_a_run_made_by_the_same_command_and_config(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_run(cmd, env, check, cwd):
        calls.append(cmd)
        out = Path(cmd[cmd.index("--results") + 1])
        out.write_text(json.dumps({"steps": 3, "final_val_loss": float(len(calls)), "consumed_layer_tokens": 1,
                                   "wall_s": 1.0, "curve": []}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    planner = compare.Planner(RECIPE, train_iters=200, seq_len=256, num_layers=8)

    def go(*flags: str, seed: int = 1234, steps: int = 300) -> dict:
        args = compare.parse_args(["--out", str(tmp_path), *flags])
        args.seq_length, args.num_layers = 256, 8
        return compare.run_arm("baseline", seed, planner.config(False, steps), steps, args)

    assert go()["final_val_loss"] == 1.0
    assert go()["final_val_loss"] == 2.0  # without --resume every run is made afresh
    assert go("--resume")["final_val_loss"] == 2.0 and len(calls) == 2  # reused, same command and config
    assert go("--resume", steps=301)["final_val_loss"] == 3.0  # another config: run again
    assert go("--resume", "--dropout", "0.0", steps=301)["final_val_loss"] == 4.0  # another command: run again
    # a run that died after writing its result but before the stamp is not reused
    (tmp_path / "baseline_seed1234.run.json").unlink()
    assert go("--resume", "--dropout", "0.0", steps=301)["final_val_loss"] == 5.0


def _warmup_runner(calls: list):
    """A fake loss with its best at warmup 10 (any LR) and LR 2e-3 (any warmup) for every arm."""
    def run(name, seed, ds, steps, args, tag="", lr_source=None):
        calls.append((name, seed, tag))
        lr, w = ds["optimizer"]["params"]["lr"], ds["scheduler"]["params"]["warmup_num_steps"]
        return {"arm": name, "steps": steps, "final_val_loss": 2.0 + 50 * abs(lr - 2e-3) + 0.01 * abs(w - 10),
                "consumed_layer_tokens": 1, "wall_s": 1.0, "curve": []}
    return run


def test_coordinate_sweep_runs_lrs_then_warmups_at_the_best_lr(tmp_path) -> None:
    warmup = RECIPE["scheduler"]["params"]["warmup_num_steps"]
    assert warmup == 20  # the config's warmup is in the grid below and is not run twice
    calls: list = []
    summary = compare.main(["--lr-grid", "1e-3,2e-3,4e-3", "--warmup-grid", "5,10,20", "--sweep", "coordinate",
                            "--out", str(tmp_path)], runner=_warmup_runner(calls))
    sweep_tags = [c[2] for c in calls if c[0] == "baseline" and c[1] == 999]
    # the LR phase at the config's warmup (tagged wNone, as a plain LR sweep names it), then the other warmups
    assert sweep_tags == ["_lr0.001_wNone", "_lr0.002_wNone", "_lr0.004_wNone", "_lr0.002_w5", "_lr0.002_w10"]
    for arm in ("baseline", "random-ltd"):
        assert summary["settings"][arm] == {"lr": 2e-3, "warmup": 10, "steps": 200}
        assert [t["warmup"] for t in summary["sweep"][arm]] == [20, 20, 20, 5, 10]
    assert "lr 0.002 w 10: 2.0000" in (tmp_path / "table.md").read_text()
    calls.clear()
    compare.main(["--lr-grid", "1e-3,2e-3,4e-3", "--warmup-grid", "5,10,20", "--out", str(tmp_path)],
                 runner=_warmup_runner(calls))
    grid_tags = [c[2] for c in calls if c[0] == "baseline" and c[1] == 999]
    assert len(grid_tags) == 9  # the default grid: every pair
    # the config's warmup has one name in both modes, so --resume reuses a coordinate sweep's runs in a grid
    assert {"_lr0.001_wNone", "_lr0.002_wNone", "_lr0.004_wNone"} <= set(grid_tags) and "_lr0.002_w20" not in grid_tags


def test_warmup_grid_alone_sweeps_at_the_configs_lr(tmp_path) -> None:
    calls: list = []
    summary = compare.main(["--warmup-grid", "5,10", "--out", str(tmp_path)], runner=_warmup_runner(calls))
    assert [c[2] for c in calls if c[0] == "baseline" and c[1] == 999] == ["_lrconfig_w5", "_lrconfig_w10"]
    assert summary["settings"]["baseline"]["lr"] is None and summary["settings"]["baseline"]["warmup"] == 10
    text = (tmp_path / "table.md").read_text()
    assert "| config / 10 |" in text and "lr config w 5" in text


def test_lr_replay_arm_takes_random_ltds_pick_and_schedule(tmp_path) -> None:
    """baseline-ltd-lr: nothing dropped, random-ltd's steps, LR and warmup, and random-ltd's own config as the LR
    source of every seed; refused without random-ltd."""
    calls: list = []
    summary = compare.main(["--arms", "baseline,random-ltd,baseline-ltd-lr", "--seeds", "2", "--lr-grid",
                            "1e-3,2e-3,4e-3", "--train-iters", "150", "--out", str(tmp_path)],
                           runner=_fake_runner(calls))
    assert summary["settings"]["baseline-ltd-lr"] == summary["settings"]["random-ltd"] == {
        "lr": 2e-3, "warmup": 20, "steps": 150}
    replays = [c for c in calls if c[0] == "baseline-ltd-lr"]
    assert [c[1] for c in replays] == [1234, 1235]  # not swept
    planner = compare.Planner(RECIPE, train_iters=150, seq_len=256, num_layers=8)
    assert all(c[4] == planner.config(True, 150, 2e-3, 20) for c in replays)
    assert all(c[4] is None for c in calls if c[0] != "baseline-ltd-lr")
    text = (tmp_path / "table.md").read_text()
    assert "| baseline-ltd-lr | 150 | 0.002 / 20 (random-ltd's LR per step) |" in text
    assert "random-ltd − baseline-ltd-lr" in text and "baseline-ltd-lr − baseline" in text
    with pytest.raises(SystemExit, match="baseline-ltd-lr replays random-ltd's LR schedule; add random-ltd"):
        compare.main(["--arms", "baseline,baseline-ltd-lr", "--out", str(tmp_path)], runner=_fake_runner([]))


def test_run_arm_hands_the_lr_source_to_the_launcher_and_stamps_it(tmp_path, monkeypatch) -> None:
    calls = []

    def fake_run(cmd, env, check, cwd):
        calls.append(cmd)
        Path(cmd[cmd.index("--results") + 1]).write_text(json.dumps({"steps": 3, "final_val_loss": 1.0,
                                                                     "consumed_layer_tokens": 1, "wall_s": 1.0,
                                                                     "curve": []}))
        return subprocess.CompletedProcess(cmd, 0)

    monkeypatch.setattr(compare.subprocess, "run", fake_run)
    args = compare.parse_args(["--out", str(tmp_path), "--resume"])
    args.seq_length, args.num_layers = 256, 8
    planner = compare.Planner(RECIPE, train_iters=200, seq_len=256, num_layers=8)
    for lr in (2e-3, 2e-3, 4e-3):
        compare.run_arm("baseline-ltd-lr", 1234, planner.config(False, 200), 200, args,
                        lr_source=planner.config(True, 200, lr))
    assert len(calls) == 2  # the same source is reused; another source (its LR) is run again
    cmd = calls[-1]
    assert "--baseline" in cmd
    source = json.loads(Path(cmd[cmd.index("--lr-schedule-of") + 1]).read_text())
    assert source == planner.config(True, 200, 4e-3)
