"""RandomLTDCallback: random-LTD for any transformers.Trainer subclass (schedule, LayerToken LR, metrics to every
reporter, exact resume), W&B offline without credentials for RandomLTDTrainer and the callback, and TRL's SFTTrainer
with a PEFT LoRA model (skipped when trl/peft are not installed)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from test_transformers_trainer import LR, SEQ, Spy, Tokens, check_run, ds_config, model  # noqa: E402
from transformers import Trainer, TrainingArguments  # noqa: E402

from random_ltd.integrations.transformers import RandomLTDTrainer  # noqa: E402
from random_ltd.integrations.transformers.callback import RandomLTDCallback  # noqa: E402
from random_ltd.integrations.transformers.trainer import STATE_FILE  # noqa: E402
from random_ltd.monitor import METRIC_KEYS  # noqa: E402


class StepSpy(Spy):
    """Spy's rows, taken at the start of each optimizer step: the callback runs first (so at
    on_pre_optimizer_step the step is already counted), and the LR and kept lengths of a step are set by then."""

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        super().on_pre_optimizer_step(args, state, control, optimizer=optimizer, **kwargs)

    def on_pre_optimizer_step(self, args, state, control, optimizer=None, **kwargs):
        pass


class SomeTrainer(Trainer):
    """Stands for any Trainer subclass (SFTTrainer, DPOTrainer, ...): its own compute_loss, nothing random-LTD."""

    def compute_loss(self, model, inputs, return_outputs=False, **kwargs):
        return super().compute_loss(model, inputs, return_outputs=return_outputs, **kwargs)


def args_for(out, steps, **kw) -> TrainingArguments:
    base = dict(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2, max_steps=steps,
                learning_rate=LR, logging_steps=1, save_steps=3, report_to=[], use_cpu=True, seed=3,
                dataloader_num_workers=0, save_only_model=False, lr_scheduler_type="constant")
    base.update(kw)
    return TrainingArguments(**base)


def train_with_callback(out, steps, resume=None, **kw):
    spy = StepSpy()
    cb = RandomLTDCallback(ds_config(**kw))
    trainer = SomeTrainer(model=model(), args=args_for(out, steps), train_dataset=Tokens(), callbacks=[spy, cb])
    trainer.random_ltd = cb.run  # what check_run reads
    spy.trainer = trainer
    trainer.train(resume_from_checkpoint=resume)
    return trainer, spy, cb


def test_callback_on_a_trainer_subclass_schedule_lr_logs_and_exact_resume(tmp_path):
    full, spy, cb = train_with_callback(tmp_path / "a", 6)
    assert full.callback_handler.callbacks[0] is cb  # first: reporters see the metrics it adds
    check_run(full, spy, 6)  # kept lengths per step, LayerToken LR, exact layer-token counts, metrics in logs
    assert os.path.exists(tmp_path / "a" / "checkpoint-3" / STATE_FILE)
    resumed, spy_b, _ = train_with_callback(tmp_path / "a", 6, resume=str(tmp_path / "a" / "checkpoint-3"))
    assert len(spy_b.rows) == 3 and spy_b.rows == spy.rows[3:]
    check_run(resumed, spy_b, 6)
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)
    assert "layer-tokens" in cb.random_ltd_summary()


def test_callback_equals_random_ltd_trainer(tmp_path):
    via_callback, spy_a, _ = train_with_callback(tmp_path / "cb", 4)
    spy = StepSpy()
    trainer = RandomLTDTrainer(model=model(), args=args_for(tmp_path / "tr", 4), train_dataset=Tokens(),
                               callbacks=[spy], random_ltd_config=ds_config())
    spy.trainer = trainer
    trainer.train()
    assert spy.rows == spy_a.rows
    for p, q in zip(trainer.model.parameters(), via_callback.model.parameters()):
        assert torch.equal(p, q)


def test_callback_metrics_reach_a_reporting_integration(tmp_path):
    """report_to=tensorboard: TensorBoard's callback (a default callback, before user ones) gets random_ltd/*."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cb = RandomLTDCallback(ds_config(lr_schedule=False))
    trainer = SomeTrainer(model=model(), args=args_for(tmp_path, 2, report_to=["tensorboard"]),
                          train_dataset=Tokens(), callbacks=[cb])
    trainer.train()
    files = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path) for f in fs if "tfevents" in f]
    assert files
    tags = set()
    for f in files:
        acc = EventAccumulator(f)
        acc.Reload()
        tags |= set(acc.Tags()["scalars"])
    assert {f"train/{k}" for k in METRIC_KEYS} <= tags, tags


def test_callback_replaces_a_passed_scheduler_with_layer_token_lr(tmp_path, caplog):
    m = model()
    opt = torch.optim.AdamW(m.parameters(), lr=LR)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    spy = StepSpy()
    cb = RandomLTDCallback(ds_config())
    with caplog.at_level("WARNING", logger="random_ltd"):
        trainer = SomeTrainer(model=m, args=args_for(tmp_path, 3), train_dataset=Tokens(), callbacks=[spy, cb],
                              optimizers=(opt, sched))
    assert any("replaces the lr_scheduler" in r.getMessage() for r in caplog.records)
    trainer.random_ltd = cb.run
    spy.trainer = trainer
    trainer.train()
    check_run(trainer, spy, 3)  # the LR followed LayerToken LR, not the constant LambdaLR


def test_callback_without_a_trainer_says_how_to_attach(tmp_path):
    cb = RandomLTDCallback(ds_config())
    with pytest.raises(RuntimeError, match="attach"):
        cb.on_train_begin(args_for(tmp_path, 1), None, None)


# --------------------------------------------------------------------------------------------------------------------
# W&B offline by default
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def wandb_env(tmp_path):
    wandb = pytest.importorskip("wandb")
    wandb.finish()  # a run left open by an earlier test would receive this test's logs
    keys = ("WANDB_MODE", "WANDB_API_KEY", "WANDB_DIR", "WANDB_SILENT", "WANDB_CONSOLE", "NETRC", "WANDB_PROJECT")
    saved = {k: os.environ.get(k) for k in keys}
    for k in keys:
        os.environ.pop(k, None)
    os.environ.update(WANDB_DIR=str(tmp_path), NETRC=str(tmp_path / "no-netrc"), WANDB_SILENT="true",
                      WANDB_CONSOLE="off")
    yield tmp_path
    wandb.finish()
    wandb.teardown()  # the W&B singleton keeps this test's settings (WANDB_DIR) for later runs otherwise
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.mark.parametrize("form", ["trainer", "callback"])
def test_report_to_wandb_without_credentials_runs_offline(wandb_env, form):
    args = args_for(wandb_env / "out", 2, report_to=["wandb"])
    if form == "trainer":
        trainer = RandomLTDTrainer(model=model(), args=args, train_dataset=Tokens(),
                                   random_ltd_config=ds_config(lr_schedule=False))
    else:
        trainer = SomeTrainer(model=model(), args=args, train_dataset=Tokens(),
                              callbacks=[RandomLTDCallback(ds_config(lr_schedule=False))])
    trainer.train()  # before: wandb.errors.UsageError: No API key configured
    assert os.environ["WANDB_MODE"] == "offline"
    import wandb

    assert wandb.run is not None and wandb.run.offline  # the run the Trainer's W&B callback started
    assert list(Path(wandb.run.dir).parent.glob("run-*.wandb"))


# --------------------------------------------------------------------------------------------------------------------
# TRL SFTTrainer + PEFT LoRA
# --------------------------------------------------------------------------------------------------------------------


def tiny_llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=61, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                        bos_token_id=0, eos_token_id=0, pad_token_id=0))


def sft_rows() -> list[dict]:
    """Pre-tokenized rows (``skip_prepare_dataset``): counting sequences over ids 1..60."""
    rows = []
    for i in range(32):
        start = int(torch.randint(1, 61, (1,), generator=torch.Generator().manual_seed(i)))
        rows.append({"input_ids": [(start + j) % 60 + 1 for j in range(SEQ)]})
    return rows


def sft_dataset():
    import pyarrow as pa
    from datasets import Dataset

    # a fixed fingerprint: no dill hashing of the table (which fails for some dill/pyarrow version pairs)
    return Dataset(pa.Table.from_pylist(sft_rows()), fingerprint="random-ltd-sft-test")


def tiny_tokenizer():
    """A word-level tokenizer over t0..t60 (t0 = pad/eos/unk), built offline: SFTTrainer needs a processing class."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(61)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t0", unk_token="t0")


def sft_run(out, steps, resume=None):
    from peft import LoraConfig, get_peft_model
    from trl import SFTConfig, SFTTrainer

    base = tiny_llama()
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                                  "o_proj"], lora_dropout=0.0))
    cfg = ds_config(lr_schedule=False)
    cfg["data_efficiency"]["data_routing"]["random_ltd"]["random_ltd_schedule"]["min_value"] = 8
    cb = RandomLTDCallback(cfg)
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=4, max_steps=steps, learning_rate=1e-2,
                     logging_steps=1, save_steps=4, report_to=[], use_cpu=True, seed=3, dataloader_num_workers=0,
                     lr_scheduler_type="constant", max_length=SEQ, packing=False, save_only_model=False,
                     dataset_kwargs={"skip_prepare_dataset": True})
    trainer = SFTTrainer(model=peft_model, args=args, train_dataset=sft_dataset(), processing_class=tiny_tokenizer(),
                         callbacks=[cb])
    trainer.train(resume_from_checkpoint=resume)
    return trainer, cb, base


def test_trl_sft_trainer_with_lora(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("peft")
    pytest.importorskip("datasets")
    from random_ltd.layers import RandomLTDLayer

    full, cb, base = sft_run(tmp_path / "sft", 8)
    layers = base.model.layers
    assert [isinstance(layer, RandomLTDLayer) for layer in layers] == [False, True, True, False]
    logs = [h for h in full.state.log_history if "loss" in h]
    assert len(logs) == 8 and all(k in logs[-1] for k in METRIC_KEYS)
    assert logs[0]["random_ltd/kept_length"] == 8 and logs[-1]["random_ltd/kept_length"] == SEQ
    assert sum(h["loss"] for h in logs[-2:]) < sum(h["loss"] for h in logs[:2])
    assert cb.run.schedule.saved_fraction > 0
    assert os.path.exists(tmp_path / "sft" / "checkpoint-4" / STATE_FILE)

    resumed, cb_b, _ = sft_run(tmp_path / "sft", 8, resume=str(tmp_path / "sft" / "checkpoint-4"))
    assert cb_b.run.schedule.state_dict() == cb.run.schedule.state_dict()
    for p, q in zip(full.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)

    # the merged adapter is a plain Llama: loads strict into an unconverted model, same eval outputs
    merged = full.model.merge_and_unload()
    plain = tiny_llama()
    plain.load_state_dict(merged.state_dict(), strict=True)
    merged.eval()
    plain.eval()
    x = torch.tensor([sft_rows()[0]["input_ids"]])
    with torch.no_grad():
        assert torch.allclose(plain(x).logits, merged(x).logits, atol=1e-6)
