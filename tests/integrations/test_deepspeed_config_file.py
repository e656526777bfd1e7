"""random_ltd.initialize reads a config file as deepspeed.initialize would: Hjson comments pass, duplicate keys and
unreadable files are a ConfigError before DeepSpeed builds anything."""

from __future__ import annotations

import sys
from pathlib import Path

import hjson
import pytest

import random_ltd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "layers"))
from tiny_models import TinyGPT  # noqa: E402

pytest.importorskip("deepspeed")

pytestmark = [
    pytest.mark.usefixtures("dist_env"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
]

L, SEQ = 4, 32
RLTD = "data_efficiency.data_routing.random_ltd"

CONFIG_TEXT = """{
  // comments, as DeepSpeed's hjson reader accepts them
  "train_micro_batch_size_per_gpu": 2,
  "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": true}},
  "steps_per_print": 1000000000,
  "data_efficiency": {"enabled": true, "data_routing": {"enabled": true, "random_ltd": {
    "enabled": true, "total_layer_num": %(layers)d, "hidden_state_order": "batch_seq_dim", %(extra)s
    "random_ltd_schedule": {"min_value": 8, "max_value": 32, "schedule_config": {"require_steps": 6,
                                                                                  "seq_per_step": 8}}}}}
}
"""


def model() -> TinyGPT:
    return TinyGPT(vocab=64, hidden=16, layers=L, seq=SEQ)


def init(config: str | Path | dict):
    m = model()
    return random_ltd.initialize(model=m, model_parameters=m.parameters(), config=config)


def test_initialize_accepts_hjson_comments(tmp_path: Path) -> None:
    path = tmp_path / "ds.json"
    path.write_text(CONFIG_TEXT % {"layers": L, "extra": ""})
    engine, *_ = init(str(path))
    assert engine.random_ltd_state.enabled and engine.random_ltd_schedule.config.total_layer_num == L


def test_initialize_rejects_duplicate_keys(tmp_path: Path) -> None:
    path = tmp_path / "dup.json"
    # json.load would keep the last total_layer_num (4, the model's) and train; DeepSpeed refuses the file
    path.write_text(CONFIG_TEXT % {"layers": 6, "extra": f'"total_layer_num": {L},'})
    with pytest.raises(random_ltd.ConfigError, match=rf"^{RLTD}\.total_layer_num: given 2 times"):
        init(path)


def test_initialize_missing_file_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "nope.json"
    with pytest.raises(random_ltd.ConfigError, match="no such config file"):
        init(path)
    assert not path.exists()


def test_initialize_min_lr_above_optimizer_lr_fails_before_deepspeed() -> None:
    """Used to pass validation and fail inside deepspeed.initialize (LayerTokenLR's constructor)."""
    lr_block = ('"layer_token_lr_schedule": {"enabled": true, "total_layer_tokens": 100000, "min_lr": 0.01},')
    config = hjson.loads(CONFIG_TEXT % {"layers": L, "extra": lr_block})  # a dict: the check is not about files
    with pytest.raises(random_ltd.ConfigError, match=rf"^{RLTD}\.layer_token_lr_schedule\.min_lr: 0\.01 > "
                                                     r"optimizer\.params\.lr 0\.001"):
        init(config)
