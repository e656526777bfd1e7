"""Config: DeepSpeed drop-in compatibility, defaults, extensions and one clear error per invalid field."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest

from random_ltd.config import (
    RANDOM_LTD_PATH,
    ConfigError,
    LayerTokenLRConfig,
    LayerTokenLRSchedule,
    RandomLTDConfig,
    ScheduleConfig,
    ScheduleParams,
    layer_token_lr_config_from_deepspeed,
)

ROOT = Path(__file__).resolve().parents[1]
GPT_JSON = ROOT / "configs" / "ds_gpt3_1.3b_random_ltd.json"
BERT_JSON = ROOT / "configs" / "ds_bert_large_random_ltd.json"
DELETE = object()


def load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def mutated(ds: dict[str, Any], dotted: str, value: Any) -> dict[str, Any]:
    """Deep copy of ``ds`` with the key at ``dotted`` (relative to the whole config) set, or deleted for DELETE."""
    out = copy.deepcopy(ds)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node.setdefault(key, {})
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


RLTD = RANDOM_LTD_PATH  # short alias for the case table


# --------------------------------------------------------------------------------------------------------------------
# Compatibility with DeepSpeed's own example configs
# --------------------------------------------------------------------------------------------------------------------


def test_gpt_config_loads_unchanged() -> None:
    cfg = RandomLTDConfig.from_deepspeed(GPT_JSON)
    assert cfg.enabled is True
    assert cfg.total_layer_num == 24
    assert cfg.random_ltd_layer_num == 22
    assert cfg.random_ltd_layer_id == list(range(1, 23))
    assert cfg.layer_ids == tuple(range(1, 23))
    assert cfg.num_full_layers == 2
    assert cfg.model_type == "decoder"
    assert cfg.hidden_state_order == "seq_batch_dim"
    assert cfg.model_mask_name == "attention_mask"
    sched = cfg.random_ltd_schedule
    assert (sched.min_value, sched.max_value, sched.schedule_type) == (128, 2048, "fixed_linear")
    assert (sched.schedule_config.require_steps, sched.schedule_config.seq_per_step) == (200000, 16)
    assert sched.schedule_config.require_tokens is None
    lr = cfg.layer_token_lr_schedule
    assert lr.enabled is False
    assert lr.total_layer_tokens == 5019274969088
    assert lr.warmup_layer_tokens == 24 * 375_000_000
    assert lr.warmup_type == "linear"
    assert cfg.seed == 1234
    assert cfg.layer_keep_ratios is None


def test_bert_config_loads_unchanged() -> None:
    cfg = RandomLTDConfig.from_deepspeed(str(BERT_JSON))
    assert cfg.enabled is True
    assert cfg.total_layer_num == 24
    assert cfg.random_ltd_layer_id == list(range(1, 23))
    assert cfg.model_type == "encoder"
    assert cfg.model_mask_name == "attention_mask"
    sched = cfg.random_ltd_schedule
    assert (sched.min_value, sched.max_value) == (128, 512)
    assert sched.schedule_config.require_steps == 2_000_000
    assert sched.schedule_config.seq_per_step == 16
    assert cfg.layer_token_lr_schedule.enabled is False


@pytest.mark.parametrize("path", [GPT_JSON, BERT_JSON], ids=["gpt", "bert"])
def test_dict_str_and_path_inputs_agree(path: Path) -> None:
    assert RandomLTDConfig.from_deepspeed(load(path)) == RandomLTDConfig.from_deepspeed(str(path))
    assert RandomLTDConfig.from_deepspeed(path) == RandomLTDConfig.from_deepspeed(str(path))


@pytest.mark.parametrize("path", [GPT_JSON, BERT_JSON], ids=["gpt", "bert"])
def test_deepspeed_parses_the_same_files_to_the_same_values(path: Path) -> None:
    """DeepSpeed's own parser accepts our example configs, and reads the same numbers we do."""
    ds_config = pytest.importorskip("deepspeed.runtime.data_pipeline.config")
    ds = ds_config.get_data_efficiency_config(load(path))["data_routing"]["random_ltd"]
    ours = RandomLTDConfig.from_deepspeed(path)
    assert ds["enabled"] == ours.enabled
    assert ds["total_layer_num"] == ours.total_layer_num
    assert ds["random_ltd_layer_num"] == ours.random_ltd_layer_num
    assert ds["random_ltd_layer_id"] == ours.random_ltd_layer_id
    assert ds["model_mask_name"] == ours.model_mask_name
    assert ds["model_type"] == ours.model_type
    assert ds["hidden_state_order"] == ours.hidden_state_order
    assert ds["random_ltd_schedule"] == ours.random_ltd_schedule.model_dump(exclude_none=True)
    assert ds["layer_token_lr_schedule"]["enabled"] == ours.layer_token_lr_schedule.enabled


def test_block_alone_via_model_validate_and_constructor() -> None:
    block = load(GPT_JSON)["data_efficiency"]["data_routing"]["random_ltd"]
    assert RandomLTDConfig.model_validate(block) == RandomLTDConfig.from_deepspeed(GPT_JSON)
    assert RandomLTDConfig(**block) == RandomLTDConfig.from_deepspeed(GPT_JSON)
    assert RandomLTDConfig.model_validate_json(json.dumps(block)) == RandomLTDConfig.model_validate(block)


# --------------------------------------------------------------------------------------------------------------------
# enabled flags
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "ds",
    [
        {},
        {"train_batch_size": 8},
        {"data_efficiency": {"enabled": True}},
        {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True}}},
    ],
    ids=["empty", "no-data-efficiency", "no-data-routing", "no-random-ltd-block"],
)
def test_missing_block_gives_disabled_config(ds: dict[str, Any]) -> None:
    cfg = RandomLTDConfig.from_deepspeed(ds)
    assert cfg.enabled is False
    assert cfg == RandomLTDConfig()


@pytest.mark.parametrize(
    ("key", "value", "named"),
    [
        ("data_efficiency.enabled", False, "data_efficiency.enabled"),
        ("data_efficiency.enabled", DELETE, "data_efficiency.enabled"),
        ("data_efficiency.data_routing.enabled", False, "data_efficiency.data_routing.enabled"),
        ("data_efficiency.data_routing.enabled", DELETE, "data_efficiency.data_routing.enabled"),
    ],
    ids=["de-false", "de-missing", "dr-false", "dr-missing"],
)
def test_parent_enabled_flags_off_disable_random_ltd(key: str, value: Any, named: str) -> None:
    ds = mutated(load(GPT_JSON), key, value)
    with pytest.warns(UserWarning, match=named.replace(".", r"\.")):
        cfg = RandomLTDConfig.from_deepspeed(ds)
    assert cfg.enabled is False
    assert cfg.total_layer_num == 24  # the rest of the block is still parsed


def test_parent_flag_off_does_not_require_the_rest_of_the_block() -> None:
    ds = {"data_efficiency": {"enabled": False, "data_routing": {"enabled": True, "random_ltd": {"enabled": True}}}}
    with pytest.warns(UserWarning, match="random-LTD is disabled"):
        assert RandomLTDConfig.from_deepspeed(ds).enabled is False


def test_random_ltd_enabled_false_disables_without_warning(recwarn: pytest.WarningsRecorder) -> None:
    cfg = RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), RLTD + ".enabled", False))
    assert cfg.enabled is False
    assert not [w for w in recwarn if issubclass(w.category, UserWarning)]


def test_disabled_block_requires_nothing_else() -> None:
    assert RandomLTDConfig.model_validate({"enabled": False}).enabled is False
    assert RandomLTDConfig.model_validate({}).enabled is False
    ds = {"data_efficiency": {"enabled": True, "data_routing": {"enabled": True, "random_ltd": {"enabled": False}}}}
    assert RandomLTDConfig.from_deepspeed(ds).enabled is False


def test_disabled_block_is_still_type_checked() -> None:
    with pytest.raises(ConfigError, match=r"random_ltd\.total_layer_num: expected an integer"):
        RandomLTDConfig.model_validate({"enabled": False, "total_layer_num": "24"})


def test_enabled_block_lists_every_missing_required_key() -> None:
    with pytest.raises(ConfigError) as info:
        RandomLTDConfig.model_validate({"enabled": True})
    text = str(info.value)
    assert f"{RLTD}.total_layer_num: required" in text
    assert f"{RLTD}.random_ltd_schedule.max_value: required" in text
    assert f"{RLTD}.random_ltd_schedule.schedule_config.require_steps: required" in text
    assert len(info.value.issues) == 3


# --------------------------------------------------------------------------------------------------------------------
# Defaults and extensions
# --------------------------------------------------------------------------------------------------------------------


def minimal(**extra: Any) -> dict[str, Any]:
    block = {
        "enabled": True,
        "total_layer_num": 12,
        "random_ltd_schedule": {"max_value": 512, "schedule_config": {"require_steps": 1000}},
    }
    block.update(extra)
    return block


def test_paper_defaults() -> None:
    cfg = RandomLTDConfig.model_validate(minimal())
    assert cfg.random_ltd_layer_id == list(range(1, 11))  # all but the first and last layer
    assert cfg.random_ltd_layer_num == 10
    sched = cfg.random_ltd_schedule
    assert sched.min_value == 128
    assert sched.schedule_type == "fixed_linear"
    assert sched.schedule_config.seq_per_step == 16
    assert cfg.model_type == "decoder"
    assert cfg.seed == 1234
    lr = cfg.layer_token_lr_schedule
    assert (lr.enabled, lr.warmup_layer_tokens, lr.warmup_type, lr.decay_type, lr.min_lr) == (
        False, 0, "linear", "cosine", 0.0)


def test_layer_num_defaults_to_len_of_given_ids() -> None:
    cfg = RandomLTDConfig.model_validate(minimal(random_ltd_layer_id=[5, 3, 4]))
    assert cfg.random_ltd_layer_num == 3
    assert cfg.random_ltd_layer_id == [5, 3, 4]  # order kept
    assert cfg.layer_ids == (3, 4, 5)


def test_seed_inherits_data_efficiency_seed() -> None:
    ds = mutated(load(GPT_JSON), "data_efficiency.seed", 77)
    assert RandomLTDConfig.from_deepspeed(ds).seed == 77
    ds = mutated(ds, RLTD + ".seed", 5)
    assert RandomLTDConfig.from_deepspeed(ds).seed == 5
    with pytest.raises(ConfigError, match=r"^data_efficiency\.seed: expected an integer"):
        RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), "data_efficiency.seed", "x"))


def test_layer_keep_ratios_from_json_string_keys() -> None:
    cfg = RandomLTDConfig.model_validate(minimal(layer_keep_ratios={"3": 0.5, 4: 1}))
    assert cfg.layer_keep_ratios == {3: 0.5, 4: 1.0}
    assert cfg.keep_ratio(3) == 0.5
    assert cfg.keep_ratio(5) == 1.0


def test_token_schedule_and_constant_schedule() -> None:
    tok = RandomLTDConfig.model_validate(minimal(random_ltd_schedule={
        "min_value": 128, "max_value": 2048, "schedule_type": "fixed_linear_tokens",
        "schedule_config": {"require_tokens": 210e9, "seq_per_step": 16}}))
    assert tok.random_ltd_schedule.schedule_config.require_tokens == 210_000_000_000
    const = RandomLTDConfig.model_validate(minimal(random_ltd_schedule={"max_value": 512, "schedule_type": "constant"}))
    assert const.random_ltd_schedule.schedule_config.require_steps is None


def test_integral_floats_are_accepted_and_fractional_rejected() -> None:
    cfg = RandomLTDConfig.model_validate(minimal(total_layer_num=12.0))
    assert cfg.total_layer_num == 12 and isinstance(cfg.total_layer_num, int)
    with pytest.raises(ConfigError, match=r"total_layer_num: expected an integer, got float 12\.5"):
        RandomLTDConfig.model_validate(minimal(total_layer_num=12.5))


def test_config_is_frozen() -> None:
    cfg = RandomLTDConfig.model_validate(minimal())
    with pytest.raises(Exception, match="frozen"):
        cfg.total_layer_num = 3  # type: ignore[misc]


def test_sub_models_report_their_full_path_when_built_directly() -> None:
    with pytest.raises(ConfigError, match=rf"^{RLTD}\.random_ltd_schedule\.min_value: 4096 > max_value 2048"):
        ScheduleConfig(min_value=4096, max_value=2048)
    with pytest.raises(ConfigError, match=r"^scheduler\.params\.min_lr: 0\.5 > lr 0\.1"):
        LayerTokenLRConfig(total_layer_tokens=10, lr=0.1, min_lr=0.5)


# --------------------------------------------------------------------------------------------------------------------
# One clear error per invalid field: (key relative to the random_ltd block, value, substrings of the message)
# --------------------------------------------------------------------------------------------------------------------

S = "random_ltd_schedule"
SC = "random_ltd_schedule.schedule_config"
LR = "layer_token_lr_schedule"
INVALID_CASES = [
    (f"{S}.min_value", 4096, [f"{RLTD}.{S}.min_value: 4096 > max_value 2048"]),
    (f"{S}.min_value", 0, [f"{RLTD}.{S}.min_value:", "greater than or equal to 1", "got 0"]),
    (f"{S}.min_value", 8, [f"{RLTD}.{S}.min_value: 8 < schedule_config.seq_per_step 16", "0 kept"]),
    (f"{S}.min_value", True, [f"{RLTD}.{S}.min_value: expected an integer, got boolean True"]),
    (f"{S}.max_value", DELETE, [f"{RLTD}.{S}.max_value: required"]),
    (f"{S}.max_value", "2048", [f"{RLTD}.{S}.max_value: expected an integer, got str '2048'"]),
    (f"{S}.schedule_type", "fixed_root",
     [f"{RLTD}.{S}.schedule_type:", "'fixed_linear', 'fixed_linear_tokens' or 'constant'", "'fixed_root'"]),
    (S, 5, [f"{RLTD}.{S}:", "valid dictionary", "got 5"]),
    (f"{SC}.seq_per_step", 0, [f"{RLTD}.{SC}.seq_per_step:", "greater than or equal to 1", "got 0"]),
    (f"{SC}.require_steps", 0, [f"{RLTD}.{SC}.require_steps:", "greater than or equal to 1", "got 0"]),
    (f"{SC}.require_steps", DELETE, [f"{RLTD}.{SC}.require_steps: required for schedule_type 'fixed_linear'"]),
    (f"{SC}.require_tokens", 10**9, [f"{RLTD}.{SC}.require_tokens: 1000000000 is only allowed with", "tokens'"]),
    (f"{SC}.require_step", 5, [f"{RLTD}.{SC}.require_step: unknown key 'require_step'",
                               "allowed keys: require_steps, seq_per_step, require_tokens"]),
    ("random_ltd_layer_num", 21, [f"{RLTD}.random_ltd_layer_num: 21 != len(random_ltd_layer_id) 22"]),
    ("random_ltd_layer_id", [0, *range(2, 23), 24],
     [f"{RLTD}.random_ltd_layer_id: layer ids [24] outside [0, 24)"]),
    ("random_ltd_layer_id", [1, 1, *range(3, 23)], [f"{RLTD}.random_ltd_layer_id: duplicate layer ids [1]"]),
    ("random_ltd_layer_id", "1,2", [f"{RLTD}.random_ltd_layer_id:", "valid list", "'1,2'"]),
    ("random_ltd_layer_id", [1, "x", *range(3, 23)], [f"{RLTD}.random_ltd_layer_id[1]: expected an integer"]),
    ("total_layer_num", 0, [f"{RLTD}.total_layer_num:", "greater than or equal to 1", "got 0"]),
    ("total_layer_num", DELETE, [f"{RLTD}.total_layer_num: required when random-LTD is enabled"]),
    ("total_layer_num", 20, [f"{RLTD}.random_ltd_layer_id: layer ids [20, 21, 22] outside [0, 20)"]),
    ("model_type", "decoderr", [f"{RLTD}.model_type:", "'decoder' or 'encoder'", "'decoderr'"]),
    ("hidden_state_order", "bsd", [f"{RLTD}.hidden_state_order:", "'seq_batch_dim' or 'batch_seq_dim'", "'bsd'"]),
    ("model_mask_name", 5, [f"{RLTD}.model_mask_name:", "valid string", "got 5"]),
    ("enabled", "true", [f"{RLTD}.enabled:", "valid boolean", "'true'"]),
    ("seed", -1, [f"{RLTD}.seed:", "greater than or equal to 0"]),
    ("foo", 1, [f"{RLTD}.foo: unknown key 'foo'", "allowed keys: enabled, total_layer_num"]),
    ("global_batch_size", 512, [f"{RLTD}.global_batch_size: unknown key", "engine injects"]),
    ("layer_keep_ratios", {"0": 0.5}, [f"{RLTD}.layer_keep_ratios: layer ids [0] are not random-LTD layers"]),
    ("layer_keep_ratios", {"5": 1.5}, [f"{RLTD}.layer_keep_ratios.5:", "less than or equal to 1", "1.5"]),
    ("layer_keep_ratios", {"5": 0}, [f"{RLTD}.layer_keep_ratios.5:", "greater than 0"]),
    ("layer_keep_ratios", {"five": 0.5}, [f"{RLTD}.layer_keep_ratios.five (key): expected an integer"]),
    (LR, {"enabled": True}, [f"{RLTD}.{LR}.total_layer_tokens: required when the LayerToken LR schedule is enabled"]),
    (LR, {"enabled": True, "total_layer_tokens": 100, "warmup_layer_tokens": 101},
     [f"{RLTD}.{LR}.warmup_layer_tokens: 101 > total_layer_tokens 100"]),
    (LR, {"enabled": True, "total_layer_tokens": 100, "warmup_type": "log"},
     [f"{RLTD}.{LR}.warmup_type: 'log' is not supported", "allowed: 'linear'"]),
    (f"{LR}.warmup_type", "cubic", [f"{RLTD}.{LR}.warmup_type:", "'linear' or 'log'", "'cubic'"]),
    (f"{LR}.decay_type", "exp", [f"{RLTD}.{LR}.decay_type:", "'linear', 'cosine' or 'constant'", "'exp'"]),
    (f"{LR}.min_lr", -1.0, [f"{RLTD}.{LR}.min_lr:", "greater than or equal to 0"]),
    (f"{LR}.min_lr", float("nan"), [f"{RLTD}.{LR}.min_lr: expected a finite number"]),
    (f"{LR}.lr", 0.1, [f"{RLTD}.{LR}.lr: unknown key 'lr'"]),
]


@pytest.mark.parametrize(
    ("key", "value", "expected"), INVALID_CASES, ids=[f"{k}={v!r}"[:60] for k, v, _ in INVALID_CASES]
)
def test_each_invalid_field_gets_a_clear_error(key: str, value: Any, expected: list[str]) -> None:
    ds = mutated(load(GPT_JSON), f"{RLTD}.{key}", value)
    with pytest.raises(ConfigError) as info:
        RandomLTDConfig.from_deepspeed(ds)
    text = str(info.value)
    for part in expected:
        assert part in text, f"{part!r} not in {text!r}"
    assert isinstance(info.value, ValueError)
    assert all(issue.path.startswith(RLTD) for issue in info.value.issues)


def test_log_warmup_is_accepted_in_a_disabled_block() -> None:
    """A DeepSpeed config may declare warmup_type 'log' while the schedule is off (DeepSpeed never reads it)."""
    ds = mutated(load(GPT_JSON), f"{RLTD}.{LR}.warmup_type", "log")
    assert RandomLTDConfig.from_deepspeed(ds).layer_token_lr_schedule.warmup_type == "log"


@pytest.mark.parametrize(
    ("key", "value", "expected"),
    [
        ("data_efficiency", [], "data_efficiency: expected an object"),
        ("data_efficiency.data_routing", 3, "data_efficiency.data_routing: expected an object"),
        ("data_efficiency.enabled", "yes", "data_efficiency.enabled: expected true or false, got 'yes'"),
        ("data_efficiency.data_routing.enabled", 1, "data_efficiency.data_routing.enabled: expected true or false"),
        (RLTD, "on", f"{RLTD}: expected an object, got 'on'"),
    ],
)
def test_parent_blocks_are_checked(key: str, value: Any, expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + expected.replace(".", r"\.").replace("(", r"\(")):
        RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), key, value))


def test_bad_json_file(tmp_path: Path) -> None:
    bad = tmp_path / "ds.json"
    bad.write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        RandomLTDConfig.from_deepspeed(bad)
    with pytest.raises(ConfigError, match="must be a JSON object"):
        RandomLTDConfig.from_deepspeed([1, 2])  # type: ignore[arg-type]


def test_multiple_errors_are_all_reported() -> None:
    block = minimal(model_type="x", hidden_state_order="y")
    with pytest.raises(ConfigError) as info:
        RandomLTDConfig.model_validate(block)
    assert {i.path for i in info.value.issues} == {f"{RLTD}.model_type", f"{RLTD}.hidden_state_order"}
    assert str(info.value).startswith("2 config errors:")


# --------------------------------------------------------------------------------------------------------------------
# LayerToken LR config: block form vs scheduler form
# --------------------------------------------------------------------------------------------------------------------

LR_PARAMS = {"total_layer_tokens": 1000, "warmup_layer_tokens": 100, "decay_type": "linear", "min_lr": 1e-5}


def test_lr_config_none_when_not_configured() -> None:
    assert layer_token_lr_config_from_deepspeed(GPT_JSON) is None  # block present but disabled
    assert layer_token_lr_config_from_deepspeed({}) is None
    assert layer_token_lr_config_from_deepspeed({"scheduler": {"type": "WarmupLR", "params": {}}}) is None


def test_lr_config_from_scheduler_block() -> None:
    ds = {"scheduler": {"type": "LayerTokenLR", "params": {**LR_PARAMS, "lr": 3e-4}}}
    cfg = layer_token_lr_config_from_deepspeed(ds)
    assert cfg == LayerTokenLRConfig(enabled=True, lr=3e-4, warmup_type="linear", **LR_PARAMS)
    disabled = {"scheduler": {"type": "LayerTokenLR", "params": {**LR_PARAMS, "enabled": False}}}
    assert layer_token_lr_config_from_deepspeed(disabled) is None


def test_lr_config_from_random_ltd_block() -> None:
    ds = mutated(load(GPT_JSON), f"{RLTD}.{LR}.enabled", True)
    cfg = layer_token_lr_config_from_deepspeed(ds)
    assert isinstance(cfg, LayerTokenLRConfig)
    assert cfg.total_layer_tokens == 5019274969088
    assert cfg.warmup_layer_tokens == 9_000_000_000
    assert cfg.lr is None and cfg.decay_type == "cosine"


def test_lr_block_ignored_with_warning_when_random_ltd_disabled() -> None:
    ds = mutated(load(GPT_JSON), f"{RLTD}.{LR}.enabled", True)
    ds = mutated(ds, f"{RLTD}.enabled", False)
    with pytest.warns(UserWarning, match="random-LTD is disabled"):
        assert layer_token_lr_config_from_deepspeed(ds) is None


def test_lr_config_given_twice_is_an_error_naming_both_paths() -> None:
    ds = mutated(load(GPT_JSON), f"{RLTD}.{LR}.enabled", True)
    ds["scheduler"] = {"type": "LayerTokenLR", "params": LR_PARAMS}
    with pytest.raises(ConfigError) as info:
        layer_token_lr_config_from_deepspeed(ds)
    assert "scheduler" in str(info.value)
    assert f"{RLTD}.layer_token_lr_schedule" in str(info.value)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({**LR_PARAMS, "warmup": 5}, "scheduler.params.warmup: unknown key 'warmup'"),
        ({"warmup_layer_tokens": 5}, "scheduler.params.total_layer_tokens: required"),
        ({**LR_PARAMS, "lr": 0}, "scheduler.params.lr:"),
        ({**LR_PARAMS, "lr": 1e-6}, "scheduler.params.min_lr: 1e-05 > lr 1e-06"),
        ({**LR_PARAMS, "warmup_layer_tokens": 2000}, "scheduler.params.warmup_layer_tokens: 2000 > total_layer_tokens"),
    ],
)
def test_scheduler_form_errors(params: dict[str, Any], expected: str) -> None:
    with pytest.raises(ConfigError, match="^" + expected.replace(".", r"\.")):
        layer_token_lr_config_from_deepspeed({"scheduler": {"type": "LayerTokenLR", "params": params}})


def test_block_form_converts_to_lr_config() -> None:
    block = LayerTokenLRSchedule(enabled=True, **LR_PARAMS)
    assert block.to_lr_config(lr=0.1) == LayerTokenLRConfig(lr=0.1, **LR_PARAMS)


@pytest.mark.parametrize(
    "model", [RandomLTDConfig, ScheduleConfig, ScheduleParams, LayerTokenLRSchedule, LayerTokenLRConfig],
    ids=lambda m: m.__name__,
)
def test_every_field_is_documented(model: type) -> None:
    undocumented = [name for name, field in model.model_fields.items() if not (field.description or "").strip()]
    assert not undocumented


# --------------------------------------------------------------------------------------------------------------------
# Typos that would switch random-LTD off silently
# --------------------------------------------------------------------------------------------------------------------


def renamed(ds: dict[str, Any], dotted: str, new_name: str) -> dict[str, Any]:
    """Deep copy of ``ds`` with the key at ``dotted`` renamed to ``new_name`` (same parent)."""
    out = copy.deepcopy(ds)
    *parents, last = dotted.split(".")
    node = out
    for key in parents:
        node = node[key]
    node[new_name] = node.pop(last)
    return out


@pytest.mark.parametrize(
    ("dotted", "typo", "path", "hint"),
    [
        ("data_efficiency", "data_efficency", "data_efficency", "looks like 'data_efficiency'"),
        ("data_efficiency", "data-efficiency", "data-efficiency", "looks like 'data_efficiency'"),
        ("data_efficiency", "Data_Efficiency", "Data_Efficiency", "looks like 'data_efficiency'"),
        ("data_efficiency.data_routing", "data_routings", "data_efficiency.data_routings",
         "did you mean 'data_routing'"),
        ("data_efficiency.data_routing", "data-routing", "data_efficiency.data-routing",
         "did you mean 'data_routing'"),
        (RLTD, "random-ltd", "data_efficiency.data_routing.random-ltd", "did you mean 'random_ltd'"),
        (RLTD, "random_ltdd", "data_efficiency.data_routing.random_ltdd", "did you mean 'random_ltd'"),
        (RLTD, "randomltd", "data_efficiency.data_routing.randomltd", "did you mean 'random_ltd'"),
        ("data_efficiency.seed", "seeds", "data_efficiency.seeds", "did you mean 'seed'"),
        ("data_efficiency.data_routing.enabled", "enable", "data_efficiency.data_routing.enable",
         "did you mean 'enabled'"),
    ],
)
def test_misspelled_block_or_parent_is_an_error(dotted: str, typo: str, path: str, hint: str) -> None:
    ds = renamed(load(GPT_JSON), dotted, typo)
    for load_fn in (RandomLTDConfig.from_deepspeed, layer_token_lr_config_from_deepspeed):
        with pytest.raises(ConfigError) as info:
            load_fn(ds)
        assert [i.path for i in info.value.issues] == [path]
        assert hint in str(info.value)


@pytest.mark.parametrize(
    ("dotted", "where", "path"),
    [
        (RLTD, "data_efficiency.random_ltd", "data_efficiency.random_ltd"),  # one level too high
        (RLTD, "random_ltd", "random_ltd"),  # at the top level
        ("data_efficiency.data_routing", "data_routing", "data_routing"),
    ],
)
def test_misplaced_block_is_an_error_naming_its_place(dotted: str, where: str, path: str) -> None:
    ds = load(GPT_JSON)
    value = copy.deepcopy(eval_path(ds, dotted))
    ds = mutated(ds, dotted, DELETE)
    ds = mutated(ds, where, value)
    with pytest.raises(ConfigError) as info:
        RandomLTDConfig.from_deepspeed(ds)
    assert path in [i.path for i in info.value.issues]
    home = RLTD if dotted == RLTD else "data_efficiency.data_routing"
    assert home in str(info.value)


def eval_path(ds: dict[str, Any], dotted: str) -> Any:
    node: Any = ds
    for key in dotted.split("."):
        node = node[key]
    return node


def test_unknown_key_in_a_parent_is_an_error() -> None:
    for parent in ("data_efficiency", "data_efficiency.data_routing"):
        with pytest.raises(ConfigError) as info:
            RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), f"{parent}.foo", 1))
        assert [i.path for i in info.value.issues] == [f"{parent}.foo"]
        assert "unknown key 'foo'" in str(info.value)


def test_deepspeed_data_efficiency_keys_stay_accepted() -> None:
    """Everything DeepSpeed 0.19.8 reads in data_efficiency (data_sampling and its sub-blocks included) loads, also
    after DeepSpeed's own parser has filled in its defaults (it mutates the dict it is given)."""
    from deepspeed.runtime.data_pipeline.config import get_data_efficiency_config

    ds = load(GPT_JSON)
    ds["data_efficiency"]["data_sampling"] = {
        "enabled": False, "num_epochs": 2, "num_workers": 0, "pin_memory": False,
        "curriculum_learning": {"enabled": False, "data_cluster_path": "/tmp/x", "curriculum_metrics": {}},
        "dynamic_batching": {"enabled": False, "max_tokens": 4096},
    }
    expected = RandomLTDConfig.from_deepspeed(ds)
    get_data_efficiency_config(ds)
    assert RandomLTDConfig.from_deepspeed(ds) == expected
    # a config with no data_efficiency at all, and one with unrelated top-level keys, stay fine
    assert RandomLTDConfig.from_deepspeed({"train_batch_size": 8, "data_types": {}}).enabled is False
    ds = {"train_batch_size": 8}
    get_data_efficiency_config(ds)
    assert RandomLTDConfig.from_deepspeed(ds).enabled is False


def test_unknown_block_key_suggests_the_close_one() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'require_step' \(did you mean 'require_steps'\?\)"):
        RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), f"{RLTD}.{SC}.require_step", 5))


# --------------------------------------------------------------------------------------------------------------------
# Seeds: one range, [0, 2**63 - 1]; larger ones would alias smaller ones
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [2**63, 2**64, 2**64 + 1234, -1, 1e19], ids=str)
def test_seed_outside_the_range_is_an_error(seed: Any) -> None:
    with pytest.raises(ConfigError, match=rf"^{RLTD}\.seed: "):
        RandomLTDConfig.model_validate(minimal(seed=seed))
    if seed != -1:
        with pytest.raises(ConfigError, match=r"^data_efficiency\.seed: .*2\*\*63 - 1"):
            RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), "data_efficiency.seed", seed))


def test_seed_range_edges_accepted() -> None:
    from random_ltd.seeds import SEED_MAX

    assert SEED_MAX == 2**63 - 1
    assert RandomLTDConfig.model_validate(minimal(seed=SEED_MAX)).seed == SEED_MAX
    assert RandomLTDConfig.model_validate(minimal(seed=0)).seed == 0
    assert RandomLTDConfig.from_deepspeed(mutated(load(GPT_JSON), "data_efficiency.seed", SEED_MAX)).seed == SEED_MAX


# --------------------------------------------------------------------------------------------------------------------
# Layer counts: a documented upper bound, linear checks
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("enabled", [True, False], ids=["enabled", "disabled"])
@pytest.mark.parametrize("layers", [2**16 + 1, 10**12], ids=str)
def test_total_layer_num_above_the_bound_is_a_config_error(layers: int, enabled: bool) -> None:
    with pytest.raises(ConfigError) as info:
        RandomLTDConfig.model_validate(minimal(total_layer_num=layers, enabled=enabled))
    assert [i.path for i in info.value.issues] == [f"{RLTD}.total_layer_num"]
    assert "65536" in str(info.value)


def test_total_layer_num_at_the_bound_gets_the_default_layers() -> None:
    from random_ltd.config import MAX_LAYERS

    assert MAX_LAYERS == 2**16
    cfg = RandomLTDConfig.model_validate(minimal(total_layer_num=MAX_LAYERS))
    assert cfg.random_ltd_layer_id == list(range(1, MAX_LAYERS - 1))
    assert cfg.random_ltd_layer_num == MAX_LAYERS - 2


def test_duplicate_check_on_many_layers_names_the_duplicates_briefly() -> None:
    ids = [*range(2**16), 7, 9]
    with pytest.raises(ConfigError) as info:
        RandomLTDConfig.model_validate(minimal(total_layer_num=None, enabled=False, random_ltd_layer_id=ids))
    text = str(info.value)
    assert "duplicate layer ids [7, 9]" in text and "(65538 values)" in text
    assert len(text) < 1000


def test_layer_ids_bounded_without_total_layer_num() -> None:
    with pytest.raises(ConfigError, match="outside \\[0, 65536\\)"):
        RandomLTDConfig.model_validate({"random_ltd_layer_id": [1, 2**16]})
    with pytest.raises(ConfigError, match="outside \\[0, 65536\\)"):
        RandomLTDConfig.model_validate({"random_ltd_layer_id": [-1, 2]})


def test_skip_layer_layer_bounds() -> None:
    from random_ltd.config import SkipLayerConfig

    with pytest.raises(ConfigError, match=r"^skip_layer\.layers: layer ids \[65536\] >= MAX_LAYERS"):
        SkipLayerConfig(layers=[0, 2**16])
    with pytest.raises(ConfigError, match=r"^skip_layer\.layers: duplicate layer ids \[3\]"):
        SkipLayerConfig(layers=[*range(2**16), 3])
