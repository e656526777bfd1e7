"""Config sources: files are read as deepspeed.initialize reads them, and every failure is a ConfigError naming
the file (or the key path), never a raw Python error."""

from __future__ import annotations

import base64
import copy
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hjson
import pytest
from deepspeed.runtime.config_utils import dict_raise_error_on_duplicate_keys

from random_ltd.config import (
    RANDOM_LTD_PATH,
    ConfigError,
    HadSkipConfig,
    RandomLTDConfig,
    SkipLayerConfig,
    layer_token_lr_config_from_deepspeed,
)

ROOT = Path(__file__).resolve().parents[1]
GPT_JSON = ROOT / "configs" / "ds_gpt3_1.3b_random_ltd.json"
HADSKIP_JSON = ROOT / "configs" / "hadskip_cpu.json"

#: every public entry point that reads a config file
LOADERS: dict[str, Callable[[Any], Any]] = {
    "RandomLTDConfig.from_deepspeed": RandomLTDConfig.from_deepspeed,
    "layer_token_lr_config_from_deepspeed": layer_token_lr_config_from_deepspeed,
    "SkipLayerConfig.from_deepspeed": SkipLayerConfig.from_deepspeed,
    "HadSkipConfig.from_file": HadSkipConfig.from_file,
}


def gpt() -> dict[str, Any]:
    return json.loads(GPT_JSON.read_text())


def deepspeed_accepts(path: Path) -> bool:
    """What DeepSpeedConfig does with a config path (deepspeed/runtime/config.py)."""
    try:
        hjson.load(open(path), object_pairs_hook=dict_raise_error_on_duplicate_keys)
    except ValueError:
        return False
    return True


# --------------------------------------------------------------------------------------------------------------------
# Hjson, as DeepSpeed reads it
# --------------------------------------------------------------------------------------------------------------------

HJSON_TEXT = """{
  // DeepSpeed reads config files with hjson: comments are fine
  "train_batch_size": 8,
  # hash comments too
  "data_efficiency": {
    "enabled": true,
    /* and block comments */
    "data_routing": {
      "enabled": true,
      "random_ltd": {
        "enabled": true,
        "total_layer_num": 24,
        "random_ltd_schedule": {"min_value": 128, "max_value": 2048,
                                "schedule_config": {"require_steps": 200000, "seq_per_step": 16}}
      }
    }
  }
}
"""


def test_hjson_comments_are_accepted_like_deepspeed(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(HJSON_TEXT)
    assert deepspeed_accepts(path)
    cfg = RandomLTDConfig.from_deepspeed(path)
    assert cfg.enabled and cfg.total_layer_num == 24 and cfg.random_ltd_layer_id == list(range(1, 23))
    assert cfg.random_ltd_schedule.schedule_config.require_steps == 200000


def test_hadskip_file_with_comments(tmp_path: Path) -> None:
    path = tmp_path / "h.json"
    path.write_text('{\n  // twelve layers\n  "hadskip": {"budget": 3, "num_layers": 12}\n}\n')
    assert HadSkipConfig.from_file(path).budget == 3.0


@pytest.mark.parametrize("text,path", [
    ('{"train_batch_size": 8, "train_batch_size": 16}', "train_batch_size"),
    ('{"data_efficiency": {"enabled": true, "enabled": false}}', "data_efficiency.enabled"),
    ('{"data_efficiency": {"data_routing": {"random_ltd": {"total_layer_num": 24, "total_layer_num": 12}}}}',
     f"{RANDOM_LTD_PATH}.total_layer_num"),
    ('{"data_efficiency": {"data_routing": {"random_ltd": {"random_ltd_schedule": '
     '{"min_value": 128, "max_value": 2048, "min_value": 64}}}}}', f"{RANDOM_LTD_PATH}.random_ltd_schedule.min_value"),
    ('{"optimizer": {"params": {"lr": 1e-3}}, "x": [{"a": 1, "a": 2}]}', "x[0].a"),
], ids=["top", "parent", "block", "nested", "in-list"])
def test_duplicate_keys_are_rejected_like_deepspeed(tmp_path: Path, text: str, path: str) -> None:
    file = tmp_path / "dup.json"
    file.write_text(text)
    assert not deepspeed_accepts(file)  # deepspeed.initialize raises "Duplicate keys in DeepSpeed config"
    for name, load in LOADERS.items():
        if name == "HadSkipConfig.from_file":
            continue  # reads only its own block; covered below
        with pytest.raises(ConfigError) as info:
            load(file)
        issue = info.value.issues[0]
        assert issue.path == path, name
        assert "given 2 times" in issue.message and str(file) in issue.message, name


def test_hadskip_duplicate_keys(tmp_path: Path) -> None:
    file = tmp_path / "h.json"
    file.write_text('{"hadskip": {"budget": 3, "budget": 6}}')
    with pytest.raises(ConfigError, match=r"^hadskip\.budget: given 2 times"):
        HadSkipConfig.from_file(file)


def test_all_shipped_configs_load_as_before(tmp_path: Path) -> None:
    """Every JSON config of the repo reads the same through the Hjson reader as through json.load."""
    from random_ltd.config import load_deepspeed_config

    for path in sorted((ROOT / "configs").glob("*.json")):
        assert load_deepspeed_config(path) == json.loads(path.read_text()), path.name


def test_base64_config_like_deepspeed() -> None:
    """DeepSpeed also takes a base64-encoded config in place of a path (--deepspeed_config)."""
    text = base64.urlsafe_b64encode(GPT_JSON.read_bytes()).decode()
    assert RandomLTDConfig.from_deepspeed(text) == RandomLTDConfig.from_deepspeed(GPT_JSON)


# --------------------------------------------------------------------------------------------------------------------
# Unreadable sources: ConfigError naming the file
# --------------------------------------------------------------------------------------------------------------------


def _missing(tmp_path: Path) -> Path:
    return tmp_path / "no_such_config.json"


def _directory(tmp_path: Path) -> Path:
    return tmp_path


def _not_utf8(tmp_path: Path) -> Path:
    path = tmp_path / "latin1.json"
    path.write_bytes('{"hadskip": {"budget": 3}, "note": "caf\u00e9"}'.encode("latin-1"))
    return path


def _not_json(tmp_path: Path) -> Path:
    path = tmp_path / "broken.json"
    path.write_text('{"hadskip": {"budget": 3,,}}')
    return path


FAULTS = {"missing": (_missing, "no such config file"), "directory": (_directory, "is a directory"),
          "not-utf8": (_not_utf8, "not a UTF-8 text file"), "not-json": (_not_json, "not valid JSON")}


@pytest.mark.parametrize("fault", FAULTS)
@pytest.mark.parametrize("loader", LOADERS)
def test_unreadable_source_is_a_config_error_naming_the_file(tmp_path: Path, loader: str, fault: str) -> None:
    make, expected = FAULTS[fault]
    path = make(tmp_path)
    with pytest.raises(ConfigError) as info:
        LOADERS[loader](path)
    assert str(info.value).startswith(f"{path}: {expected}"), str(info.value)


def test_hadskip_from_file_non_object(tmp_path: Path) -> None:
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        HadSkipConfig.from_file(path)


# --------------------------------------------------------------------------------------------------------------------
# min_lr against the optimizer's LR
# --------------------------------------------------------------------------------------------------------------------

LR_BLOCK = f"{RANDOM_LTD_PATH}.layer_token_lr_schedule"


def with_lr_block(min_lr: float, optimizer_lr: Any, decay_type: str = "cosine") -> dict[str, Any]:
    ds = gpt()
    block = ds["data_efficiency"]["data_routing"]["random_ltd"]["layer_token_lr_schedule"]
    block.update(enabled=True, min_lr=min_lr, decay_type=decay_type)
    ds["optimizer"]["params"]["lr"] = optimizer_lr
    ds.pop("scheduler", None)
    return ds


def with_scheduler(min_lr: float, optimizer_lr: Any, **params: Any) -> dict[str, Any]:
    ds = gpt()
    # LayerToken LR as the top-level scheduler only (the paper recipe also enables it in the block)
    ds["data_efficiency"]["data_routing"]["random_ltd"]["layer_token_lr_schedule"]["enabled"] = False
    ds["optimizer"]["params"]["lr"] = optimizer_lr
    ds["scheduler"] = {"type": "LayerTokenLR", "params": {"total_layer_tokens": 10**9, "min_lr": min_lr, **params}}
    return ds


@pytest.mark.parametrize("ds,path", [
    (with_lr_block(1e-3, 2e-4), f"{LR_BLOCK}.min_lr"),
    (with_scheduler(1e-3, 2e-4), "scheduler.params.min_lr"),
], ids=["block", "scheduler"])
def test_min_lr_above_optimizer_lr_is_a_config_error(ds: dict[str, Any], path: str) -> None:
    with pytest.raises(ConfigError) as info:
        layer_token_lr_config_from_deepspeed(ds)
    assert [i.path for i in info.value.issues] == [path]
    assert "0.001 > optimizer.params.lr 0.0002" in str(info.value)


@pytest.mark.parametrize("ds", [
    with_lr_block(2e-4, 2e-4),  # equal is fine: a flat decay
    with_lr_block(1e-3, "auto"),  # HF fills "auto" later: nothing to check against
    with_lr_block(1e-3, 2e-4, decay_type="constant"),  # min_lr unused
    with_scheduler(1e-3, 2e-4, lr=2e-3),  # the schedule's own peak lr, not the optimizer's
], ids=["equal", "auto", "constant", "own-lr"])
def test_min_lr_vs_optimizer_lr_accepted(ds: dict[str, Any]) -> None:
    assert layer_token_lr_config_from_deepspeed(ds) is not None


def test_min_lr_without_optimizer_block() -> None:
    ds = with_lr_block(1e-3, 2e-4)
    del ds["optimizer"]
    assert layer_token_lr_config_from_deepspeed(copy.deepcopy(ds)).min_lr == 1e-3


def test_missing_file_given_as_str(tmp_path: Path) -> None:
    """A str path that names no file (DeepSpeed would try it as base64) is still reported as a missing file."""
    path = str(tmp_path / "ds_config.json")
    with pytest.raises(ConfigError, match="no such config file"):
        RandomLTDConfig.from_deepspeed(path)
