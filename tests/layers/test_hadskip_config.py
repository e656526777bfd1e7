"""The validated ``hadskip`` config block: defaults and errors naming the key path."""

import json

import pytest

from random_ltd.config import ConfigError, HadSkipConfig


def test_defaults_follow_the_paper():
    c = HadSkipConfig(budget=6)
    assert (c.alpha_p, c.alpha_h, c.alpha_att, c.alpha_emb, c.beta) == (1.0, 1.0, 1.0, 1.0, 1.0)
    assert c.estimator == "reinmax" and c.tau == 1.0 and c.homotopic.enabled and c.homotopic.stride == 1.0


def test_from_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"hadskip": {"budget": 3, "num_layers": 12, "homotopic": {"step_on": "convergence",
                                                                                          "tolerance": 1e-3}}}))
    c = HadSkipConfig.from_file(path)
    assert c.budget == 3.0 and c.homotopic.tolerance == 1e-3


@pytest.mark.parametrize("block,message", [
    ({}, "hadskip.budget: required key is missing"),
    ({"budget": 13, "num_layers": 12}, "hadskip.budget: 13.0 > num_layers 12"),
    ({"budget": 0}, "hadskip.budget"),
    ({"budget": 6, "tau": 0.5}, "hadskip.tau: 0.5 < 1"),
    ({"budget": 6, "estimator": "sigmoid"}, "hadskip.estimator"),
    ({"budget": 6, "beta": -1}, "hadskip.beta"),
    ({"budget": 6, "budjet": 1}, "hadskip.budjet: unknown key"),
    ({"budget": 6, "homotopic": {"step_on": "steps", "tolerance": 0.1}},
     "hadskip.homotopic.tolerance: 0.1 is only used"),
    ({"budget": 6, "homotopic": {"step_on": "steps", "max_steps_per_stage": 3}},
     "hadskip.homotopic.max_steps_per_stage: 3 is only used"),
    ({"budget": 6, "homotopic": {"step_on": "convergence", "steps_per_stage": 3}},
     "hadskip.homotopic.steps_per_stage: 3 is only used"),
    ({"budget": 6, "homotopic": {"steps_per_stage": 0}}, "hadskip.homotopic.steps_per_stage"),
    ({"budget": 6, "stages": {"stage3_steps": -1}}, "hadskip.stages.stage3_steps"),
    ({"budget": 6, "stages": {"stage1_lr": 0}}, "hadskip.stages.stage1_lr"),
    ({"budget": True}, "hadskip.budget"),
], ids=lambda v: str(v)[:40])
def test_errors_name_the_key(block, message):
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        HadSkipConfig.from_file({"hadskip": block})


@pytest.mark.parametrize("name", ["hadskip_cpu.json", "hadskip_bert_glue.json", "hadskip_automaton_cpu.json"])
def test_shipped_configs_load(name):
    from pathlib import Path

    c = HadSkipConfig.from_file(Path(__file__).resolve().parents[2] / "configs" / name)
    assert c.num_layers == 12 and c.estimator == "reinmax"
