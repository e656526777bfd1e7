"""RandomLTDTrainer: schedule per optimizer step, LayerToken LR in place of the Trainer's scheduler, random_ltd/*
metrics in the Trainer's logs, exact save/resume; plain Trainer and Trainer + DeepSpeed on CPU."""

from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from transformers import GPT2Config, GPT2LMHeadModel, TrainerCallback, TrainingArguments  # noqa: E402

from random_ltd.integrations.transformers import RandomLTDTrainer  # noqa: E402
from random_ltd.integrations.transformers.trainer import STATE_FILE  # noqa: E402
from random_ltd.monitor import METRIC_KEYS  # noqa: E402
from random_ltd.schedules import MSLGSchedule, layer_token_lr  # noqa: E402

SEQ, LAYERS, LR = 16, 4, 1e-3
LR_BLOCK = {"enabled": True, "total_layer_tokens": 6000, "warmup_layer_tokens": 1000, "decay_type": "linear"}


def ds_config(lr_schedule: bool = True, deepspeed: bool = False) -> dict:
    block = {"enabled": True, "total_layer_num": LAYERS,
             "random_ltd_schedule": {"min_value": 4, "max_value": SEQ,
                                     "schedule_config": {"require_steps": 4, "seq_per_step": 4}}}
    if lr_schedule:
        block["layer_token_lr_schedule"] = LR_BLOCK
    cfg = {"data_efficiency": {"enabled": True, "seed": 7, "data_routing": {"enabled": True, "random_ltd": block}}}
    if deepspeed:
        cfg.update({"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto",
                    "train_batch_size": "auto", "zero_optimization": {"stage": 0},
                    "optimizer": {"type": "AdamW", "params": {"lr": "auto", "torch_adam": True}},
                    "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 2}}})
    return cfg


class Tokens(torch.utils.data.Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        x = torch.randint(0, 61, (SEQ,), generator=torch.Generator().manual_seed(i))
        return {"input_ids": x, "labels": x}


def model():
    torch.manual_seed(0)
    return GPT2LMHeadModel(GPT2Config(n_layer=LAYERS, n_embd=32, n_head=4, vocab_size=61, n_positions=32,
                                      bos_token_id=0, eos_token_id=0))


class Spy(TrainerCallback):
    """Before our callback closes the step: the LR the optimizer is about to use and the layer-tokens before it."""

    def __init__(self):
        self.trainer = None
        self.rows = []
        self.reported = []  # what every report_to integration receives (their on_log)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        run = self.trainer.random_ltd
        self.rows.append((run.schedule.consumed_layer_tokens, float(optimizer.param_groups[0]["lr"]),
                          dict(run.state.kept_lengths)))

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.reported.append(dict(logs))


def train(tmp_path, steps, resume=None, deepspeed=False, **kw):
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=steps, learning_rate=LR, logging_steps=1, save_steps=3, report_to=[],
                             use_cpu=True, seed=3, dataloader_num_workers=0, save_only_model=False,
                             deepspeed=ds_config(deepspeed=True, **kw) if deepspeed else None,
                             lr_scheduler_type="constant")
    spy = Spy()
    trainer = RandomLTDTrainer(model=model(), args=args, train_dataset=Tokens(), callbacks=[spy],
                               random_ltd_config=None if deepspeed else ds_config(**kw))
    spy.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, spy


def check_run(trainer, spy, steps):
    run = trainer.random_ltd
    sched = MSLGSchedule(run.schedule.config)
    assert run.schedule.step == steps
    for t, (consumed, lr, kept) in enumerate(spy.rows):
        assert kept == sched.layer_kept_lengths(t + steps - len(spy.rows))
        expected = layer_token_lr(consumed, lr=LR, total_layer_tokens=LR_BLOCK["total_layer_tokens"],
                                  warmup_layer_tokens=LR_BLOCK["warmup_layer_tokens"], decay_type="linear")
        assert lr == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # 4 samples of 16 tokens per step; layers 1, 2 keep the scheduled length, layers 0, 3 keep all
    per_step = [4 * (2 * min(sched.kept_length(t), SEQ) + 2 * SEQ) for t in range(steps)]
    assert run.schedule.consumed_layer_tokens == sum(per_step)
    assert run.schedule.baseline_layer_tokens == steps * 4 * SEQ * LAYERS
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == steps and all(k in logs[-1] for k in METRIC_KEYS)
    assert logs[0]["random_ltd/kept_length"] == 4
    assert logs[-1]["random_ltd/consumed_layer_tokens"] == sum(per_step)
    reported = [r for r in spy.reported if "loss" in r]
    assert len(reported) == len(spy.rows) and all(k in r for r in reported for k in METRIC_KEYS)


def test_plain_trainer_schedule_lr_logs_and_exact_resume(tmp_path):
    full, spy = train(tmp_path / "a", 6)
    check_run(full, spy, 6)
    assert os.path.exists(tmp_path / "a" / "checkpoint-3" / STATE_FILE)
    resumed, spy_b = train(tmp_path / "a", 6, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert len(spy_b.rows) == 3
    check_run(resumed, spy_b, 6)
    assert spy_b.rows == spy.rows[3:]
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def test_disabled_block_is_a_counting_baseline(tmp_path):
    cfg = ds_config(lr_schedule=False)
    cfg["data_efficiency"]["data_routing"]["random_ltd"]["enabled"] = False
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=2, report_to=[],
                             use_cpu=True, logging_steps=1)
    trainer = RandomLTDTrainer(model=model(), args=args, train_dataset=Tokens(), random_ltd_config=cfg)
    trainer.train()
    run = trainer.random_ltd
    assert run.schedule.consumed_layer_tokens == run.schedule.baseline_layer_tokens == 2 * 4 * SEQ * LAYERS
    assert [h["random_ltd/saved_percent"] for h in trainer.state.log_history if "loss" in h] == [0.0, 0.0]


def test_errors(tmp_path):
    args = TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(ValueError, match="no random-LTD config"):
        RandomLTDTrainer(model=model(), args=args, train_dataset=Tokens())
    sched = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD([torch.zeros(1, requires_grad=True)]), lambda s: 1.0)
    with pytest.raises(ValueError, match="LayerToken LR"):
        RandomLTDTrainer(model=model(), args=args, train_dataset=Tokens(), random_ltd_config=ds_config(),
                         optimizers=(None, sched))


_INNER = "RANDOM_LTD_HF_DS_INNER"


def test_trainer_with_deepspeed_config_on_cpu():
    """Runs the DeepSpeed case in a fresh process: DeepSpeed's and accelerate's distributed state is process-global
    and must not leak into the plain-Trainer tests."""
    pytest.importorskip("deepspeed")
    import socket
    import subprocess
    import sys

    with socket.socket() as sock:  # a free port: a fixed one can sit in TIME_WAIT and stall the store for minutes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = dict(os.environ, **{_INNER: "1", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "RANK": "0",
                              "WORLD_SIZE": "1", "LOCAL_RANK": "0", "LOCAL_SIZE": "1"})
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                           f"{__file__}::test_deepspeed_inner"], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    assert "1 passed" in done.stdout


@pytest.mark.skipif(os.environ.get(_INNER) != "1", reason="run by test_trainer_with_deepspeed_config_on_cpu")
def test_deepspeed_inner(tmp_path):
    trainer, spy = train(tmp_path / "ds", 6, deepspeed=True)
    assert trainer.is_deepspeed_enabled
    # DeepSpeed's CPU allreduce buffer (LOCAL_SIZE == world size) is unlinked once training starts, not leaked
    shm = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{os.environ['MASTER_PORT']}_0"
    assert not os.path.exists(shm)
    check_run(trainer, spy, 6)
    ds_seen = trainer.args.hf_deepspeed_config.config
    assert "scheduler" not in ds_seen  # LayerToken LR replaced the iteration scheduler
    assert ds_seen["data_efficiency"]["data_routing"]["random_ltd"] == {"enabled": False}
    resumed, spy_b = train(tmp_path / "ds", 6, deepspeed=True, resume=str(tmp_path / "ds" / "checkpoint-3"))
    assert spy_b.rows == spy.rows[3:]
    check_run(resumed, spy_b, 6)
    for p, q in zip(trainer.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
