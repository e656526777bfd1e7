"""What launch/pretrain_gpt.py and launch/pretrain_bert.py share: Megatron-style arguments, process groups, the
DeepSpeed config with the random-LTD block, and the training loop on the engine ``random_ltd.initialize`` returns.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Callable
from typing import Any

import torch


def add_common_args(p: argparse.ArgumentParser, *, num_layers: int, hidden: int, heads: int, seq: int) -> None:
    """Megatron-style arguments (``--num-layers`` ...) plus ``--deepspeed_config`` and ``--baseline``."""
    p.add_argument("--deepspeed_config", required=True, help="DeepSpeed JSON config (with the random-LTD block)")
    p.add_argument("--baseline", action="store_true", help="switch random-LTD off (keeps layer-token accounting)")
    p.add_argument("--num-layers", type=int, default=num_layers)
    p.add_argument("--hidden-size", type=int, default=hidden)
    p.add_argument("--num-attention-heads", type=int, default=heads)
    p.add_argument("--seq-length", type=int, default=seq)
    p.add_argument("--micro-batch-size", type=int, default=None, help="overrides train_micro_batch_size_per_gpu")
    p.add_argument("--global-batch-size", type=int, default=None, help="overrides train_batch_size")
    p.add_argument("--tensor-model-parallel-size", type=int, default=1)
    p.add_argument("--sequence-parallel", action="store_true",
                   help="megatron sequence parallelism (needs tp > 1 and ZeRO stage 0 on this entry point)")
    p.add_argument("--recompute-granularity", choices=["full", "selective"], default=None)
    p.add_argument("--train-iters", type=int, default=200)
    p.add_argument("--train-tokens", type=float, default=None, help="train this many tokens (sets --train-iters)")
    p.add_argument("--train-layer-tokens", type=float, default=None,
                   help="stop once this many layer-tokens are consumed (equal-budget comparisons)")
    p.add_argument("--lr-total-layer-tokens", type=float, default=None,
                   help="LayerToken LR: decay over this many layer-tokens (Appendix C: the run's own consumption; "
                        "set it with --train-layer-tokens for an equal-budget run)")
    p.add_argument("--lr-schedule-of", default=None, metavar="CONFIG",
                   help="with --baseline: run every step at the LR that CONFIG's random-LTD run has at that step (its "
                        "LayerToken LR over its planned layer-tokens, at this run's batch and length), replacing the "
                        "iteration scheduler: a control that separates LayerToken LR's schedule from the dropping")
    p.add_argument("--hidden-dropout", type=float, default=0.0,
                   help="dropout after attention and MLP (the paper's GPT/BERT recipes: 0.1; tiny CPU runs: 0)")
    p.add_argument("--attention-dropout", type=float, default=0.0, help="dropout on attention probabilities")
    p.add_argument("--eval-interval", type=int, default=50)
    p.add_argument("--eval-iters", type=int, default=8)
    p.add_argument("--data-path", default=None,
                   help="Megatron indexed dataset prefix (PREFIX.bin/.idx); default: the embedded corpus")
    p.add_argument("--valid-data-path", default=None, help="validation prefix (default: last 2%% of --data-path)")
    p.add_argument("--vocab-size", type=int, default=None, help="vocabulary of --data-path (default: bytes)")
    p.add_argument("--data-cache-dir", default=None, help="where the embedded corpus is written once")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--save", default=None, help="checkpoint directory")
    p.add_argument("--save-interval", type=int, default=None, help="also save every N steps")
    p.add_argument("--load", default=None,
                   help="checkpoint directory to resume from (its 'latest' tag); a missing checkpoint is an error")
    p.add_argument("--allow-fresh-start", action="store_true",
                   help="with --load: start from step 0 when the directory holds no checkpoint yet (no 'latest')")
    p.add_argument("--results", default=None, help="JSON file for rank 0's results")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--local_rank", type=int, default=int(os.environ.get("LOCAL_RANK", 0)))
    add_optimizer_args(p)


def add_optimizer_args(p: argparse.ArgumentParser) -> None:
    """Megatron's optimizer arguments: used when the DeepSpeed config has no ``optimizer`` block (Megatron-DeepSpeed's
    random-LTD configs have none: Megatron builds the optimizer), see ``optimizer_from_args``."""
    g = p.add_argument_group("optimizer (only when the DeepSpeed config has no optimizer block)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--min-lr", type=float, default=None, help="LR at the end of the decay (default 0)")
    g.add_argument("--weight-decay", type=float, default=None, help="AdamW weight decay (default 0.01)")
    g.add_argument("--adam-beta1", type=float, default=None, help="default 0.9")
    g.add_argument("--adam-beta2", type=float, default=None, help="default 0.999")
    g.add_argument("--adam-eps", type=float, default=None, help="default 1e-8")
    g.add_argument("--clip-grad", type=float, default=None, help="gradient clipping (default 1.0)")
    g.add_argument("--lr-warmup-iters", type=int, default=None, help="linear warmup steps (default 0)")
    g.add_argument("--lr-decay-style", choices=["cosine", "linear", "constant"], default=None,
                   help="iteration LR decay over --train-iters (default cosine); LayerToken LR, when the config "
                        "enables it, replaces it")


_OPTIMIZER_ARGS = ("lr", "min_lr", "weight_decay", "adam_beta1", "adam_beta2", "adam_eps", "clip_grad",
                   "lr_warmup_iters", "lr_decay_style")


def optimizer_from_args(args: argparse.Namespace, ds: dict) -> None:
    """Fill ``ds`` with an AdamW ``optimizer`` (and an iteration ``scheduler``) from Megatron-style args, in place.

    Only when ``ds`` has no ``optimizer`` block; then ``--lr`` is required. With an optimizer block in the config the
    Megatron optimizer arguments are refused rather than silently ignored. ``--clip-grad`` fills
    ``gradient_clipping``; ``--min-lr`` and the warmup/decay args give a DeepSpeed ``WarmupCosineLR``
    (``cos_min_ratio = min_lr / lr``) or ``WarmupDecayLR`` scheduler unless the config has a scheduler or enables
    LayerToken LR (its decay then ends at ``--min-lr``).
    """
    given = [f"--{name.replace('_', '-')}" for name in _OPTIMIZER_ARGS if getattr(args, name, None) is not None]
    if "optimizer" in ds:
        if given:
            raise SystemExit(f"{', '.join(given)}: the DeepSpeed config {args.deepspeed_config} has an optimizer "
                             "block, which DeepSpeed uses; set these there, or remove the block to build the "
                             "optimizer from these arguments")
        return
    if args.lr is None:
        raise SystemExit(f"the DeepSpeed config {args.deepspeed_config} has no optimizer block: pass --lr (and "
                         "optionally --min-lr --weight-decay --adam-beta1 --adam-beta2 --adam-eps --clip-grad "
                         "--lr-warmup-iters --lr-decay-style), as Megatron builds it")
    min_lr = args.min_lr if args.min_lr is not None else 0.0
    if not 0.0 <= min_lr <= args.lr:
        raise SystemExit(f"--min-lr {min_lr} must be in [0, --lr {args.lr}]")
    betas = [0.9 if args.adam_beta1 is None else args.adam_beta1, 0.999 if args.adam_beta2 is None else args.adam_beta2]
    ds["optimizer"] = {"type": "AdamW", "params": {
        "lr": args.lr, "betas": betas, "eps": 1e-8 if args.adam_eps is None else args.adam_eps,
        "weight_decay": 0.01 if args.weight_decay is None else args.weight_decay,
        "torch_adam": not torch.cuda.is_available()}}  # no JIT-compiled FusedAdam on CPU
    ds.setdefault("gradient_clipping", 1.0 if args.clip_grad is None else args.clip_grad)
    lr_block = ds.get("data_efficiency", {}).get("data_routing", {}).get("random_ltd", {}) \
        .get("layer_token_lr_schedule", {})
    if lr_block.get("enabled"):
        lr_block.setdefault("min_lr", min_lr)
        return
    if "scheduler" in ds:
        return
    warmup = args.lr_warmup_iters or 0
    style = args.lr_decay_style or "cosine"
    if style == "cosine":
        ds["scheduler"] = {"type": "WarmupCosineLR", "params": {
            "total_num_steps": args.train_iters, "warmup_num_steps": warmup, "warmup_type": "linear",
            "cos_min_ratio": min_lr / args.lr, "warmup_min_ratio": 0.0}}
    elif style == "linear":
        ds["scheduler"] = {"type": "WarmupDecayLR", "params": {
            "total_num_steps": args.train_iters, "warmup_num_steps": warmup, "warmup_type": "linear",
            "warmup_min_lr": 0.0, "warmup_max_lr": args.lr}}
    elif warmup:
        ds["scheduler"] = {"type": "WarmupLR", "params": {
            "warmup_num_steps": warmup, "warmup_type": "linear", "warmup_min_lr": 0.0, "warmup_max_lr": args.lr}}


def check_precision(ds: dict) -> None:
    """fp16 needs an accelerator that supports it (DeepSpeed's CPU accelerator does not): say so before DeepSpeed."""
    if not (ds.get("fp16") or {}).get("enabled"):
        return
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    if not acc.is_fp16_supported():
        bf16 = " or \"bf16\": {\"enabled\": true}" if acc.is_bf16_supported() else ""
        raise SystemExit(f"fp16.enabled: the {acc.device_name()} accelerator here does not support fp16 training; "
                         f"set \"fp16\": {{\"enabled\": false}}{bf16} in the DeepSpeed config")


def check_args(args: argparse.Namespace) -> None:
    if args.sequence_parallel and args.tensor_model_parallel_size < 2:
        raise SystemExit("--sequence-parallel needs --tensor-model-parallel-size > 1")
    if args.data_path is not None and args.vocab_size is None:
        raise SystemExit("--data-path needs --vocab-size (the tokenizer's vocabulary size)")
    if args.lr_schedule_of is not None:
        if not args.baseline:
            raise SystemExit("--lr-schedule-of: only with --baseline (a random-LTD run follows its own LayerToken LR)")
        if not os.path.isfile(args.lr_schedule_of):
            raise SystemExit(f"--lr-schedule-of {args.lr_schedule_of}: no such file (expected a DeepSpeed JSON config "
                             f"with random-LTD and its layer_token_lr_schedule enabled)")
    check_checkpoint_args(args)


def replayed_lrs(args: argparse.Namespace, steps: int, batch: int) -> list[float]:
    """``--lr-schedule-of``: the LR of each of ``steps`` steps of that config's random-LTD run (``batch`` sequences of
    ``--seq-length`` per step), from its MSLG plan and LayerToken LR block as this launcher would fit them."""
    from random_ltd.config import RandomLTDConfig, layer_token_lr_config_from_deepspeed
    from random_ltd.schedules import plan, planned_lrs

    path = args.lr_schedule_of
    other = deepspeed_config(argparse.Namespace(**{**vars(args), "deepspeed_config": path, "baseline": False,
                                                    "lr_schedule_of": None}))
    cfg, lr_cfg = RandomLTDConfig.from_deepspeed(other), layer_token_lr_config_from_deepspeed(other)
    if not cfg.enabled or lr_cfg is None:
        raise SystemExit(f"--lr-schedule-of {path}: needs random-LTD and its layer_token_lr_schedule enabled there "
                         f"(random-LTD {'on' if cfg.enabled else 'off'}, LayerToken LR "
                         f"{'off' if lr_cfg is None else 'on'})")
    if other.get("train_batch_size", batch) != batch:
        raise SystemExit(f"--lr-schedule-of {path}: its train_batch_size {other['train_batch_size']} != this run's "
                         f"{batch} (its LR follows its own batch's layer-tokens)")
    peak = lr_cfg.lr if lr_cfg.lr is not None else other.get("optimizer", {}).get("params", {}).get("lr")
    if peak is None:
        raise SystemExit(f"--lr-schedule-of {path}: no peak LR (layer_token_lr_schedule.lr or optimizer.params.lr)")
    return planned_lrs(plan(cfg, steps, batch, args.seq_length), lr_cfg, float(peak))


def check_checkpoint_args(args: argparse.Namespace) -> None:
    """Refuse, before anything is built, a run that would silently restart or overwrite checkpoints.

    ``--load DIR`` without a checkpoint there is an error unless ``--allow-fresh-start``; a ``latest`` naming a
    missing tag is always an error; a fresh start whose ``--save`` directory already holds checkpoints is an error
    (resume with ``--load`` instead, or choose another directory).
    """
    from random_ltd.integrations.deepspeed.checkpoint import CheckpointNotFoundError, read_latest, resolve_load_tag

    fresh = True
    if args.load:
        try:
            tag = resolve_load_tag(args.load)
        except CheckpointNotFoundError as e:
            raise SystemExit(f"--load {args.load}: {e}") from None
        if tag is None and not args.allow_fresh_start:
            what = "does not exist" if not os.path.exists(args.load) else "has no 'latest' file"
            raise SystemExit(f"--load {args.load}: no checkpoint to resume from (the directory {what}); pass "
                             f"--allow-fresh-start to start from step 0")
        fresh = tag is None
    if args.save and fresh:
        try:
            existing = read_latest(args.save)
        except CheckpointNotFoundError:
            existing = ""
        if existing is not None:
            raise SystemExit(f"--save {args.save} already holds checkpoints (latest: {existing!r}) and this run "
                             f"starts from step 0; resume with --load {args.save}, or choose another --save")


def deepspeed_config(args: argparse.Namespace) -> dict:
    """The DeepSpeed config with the random-LTD block fitted to the model and the ``--baseline`` switch."""
    from random_ltd.config import load_deepspeed_config

    ds = load_deepspeed_config(args.deepspeed_config)  # as DeepSpeed reads it: Hjson, duplicate keys rejected
    if args.micro_batch_size is not None:
        ds["train_micro_batch_size_per_gpu"] = args.micro_batch_size
    if args.global_batch_size is not None:
        ds["train_batch_size"] = args.global_batch_size
    if "train_batch_size" in ds and "train_micro_batch_size_per_gpu" in ds:
        # DeepSpeed derives accumulation from the data-parallel size, which tensor parallelism changes
        ds.pop("gradient_accumulation_steps", None)
    if args.sequence_parallel and ds.get("zero_optimization", {}).get("stage", 0) != 0:
        raise SystemExit("--sequence-parallel: this entry point all-reduces sequence-parallel LayerNorm gradients "
                         "itself, which needs ZeRO stage 0")
    optimizer_from_args(args, ds)
    check_precision(ds)
    block = ds.setdefault("data_efficiency", {}).setdefault("data_routing", {}).setdefault("random_ltd", {})
    if args.baseline:
        # the baseline keeps the config's iteration "scheduler" block; LayerToken LR belongs to random-LTD
        block["enabled"] = False
        block.get("layer_token_lr_schedule", {})["enabled"] = False
        if args.lr_schedule_of is not None:
            ds.pop("scheduler", None)  # train() sets every step's LR from the replayed plan
        return ds
    if args.lr_total_layer_tokens is not None:
        lr_block = block.setdefault("layer_token_lr_schedule", {})
        if not lr_block.get("enabled"):
            raise SystemExit("--lr-total-layer-tokens: the config's layer_token_lr_schedule is not enabled")
        lr_block["total_layer_tokens"] = int(args.lr_total_layer_tokens)
    block.setdefault("total_layer_num", args.num_layers)
    block["hidden_state_order"] = "seq_batch_dim"  # megatron-core layers are [s, b, h]
    block.setdefault("random_ltd_schedule", {}).setdefault("max_value", args.seq_length)
    return ds


def init_parallel(args: argparse.Namespace) -> None:
    """torch.distributed (gloo on CPU, nccl on GPU) and megatron's tensor-parallel groups and RNG."""
    import deepspeed
    from megatron.core import parallel_state, tensor_parallel

    import random_ltd.integrations.megatron  # noqa: F401 - applies the CPU shim when CUDA is absent
    from random_ltd.integrations.deepspeed.launcher_guard import exit_with_launcher, release_shm_buffers

    exit_with_launcher()  # no orphaned ranks training on when the deepspeed launcher is killed

    deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    release_shm_buffers()  # DeepSpeed's CPU allreduce buffers would otherwise stay in /dev/shm after the run
    if torch.cuda.is_available():
        torch.cuda.set_device(args.local_rank)
    parallel_state.initialize_model_parallel(args.tensor_model_parallel_size, 1)
    torch.manual_seed(args.seed)
    tensor_parallel.model_parallel_cuda_manual_seed(args.seed)
    local = int(os.environ.get("LOCAL_SIZE", os.environ.get("LOCAL_WORLD_SIZE", 1)))
    if not torch.cuda.is_available():
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local))


def transformer_config(args: argparse.Namespace, **extra: Any):
    from megatron.core.transformer.transformer_config import TransformerConfig

    kw = dict(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
              tensor_model_parallel_size=args.tensor_model_parallel_size, sequence_parallel=args.sequence_parallel,
              use_cpu_initialization=not torch.cuda.is_available(), hidden_dropout=args.hidden_dropout,
              attention_dropout=args.attention_dropout,
              recompute_granularity=args.recompute_granularity)
    if args.recompute_granularity == "full":
        kw.update(recompute_method="uniform", recompute_num_layers=1)
    kw.update(extra)
    return TransformerConfig(**kw)


def layer_norm_override(args: argparse.Namespace):
    """On CPU under sequence parallelism megatron's local norm refuses to run; use ours (grads all-reduced here)."""
    if not args.sequence_parallel or torch.cuda.is_available():
        return None
    from random_ltd.integrations.megatron import SequenceParallelLayerNorm

    return SequenceParallelLayerNorm


def sequence_parallel_spec(base_spec):
    """``base_spec`` with ``SequenceParallelLayerNorm`` for its norms (CPU sequence parallelism)."""
    import dataclasses

    from random_ltd.integrations.megatron import SequenceParallelLayerNorm

    sub = dataclasses.replace(base_spec.submodules, input_layernorm=SequenceParallelLayerNorm,
                              pre_mlp_layernorm=SequenceParallelLayerNorm)
    return dataclasses.replace(base_spec, submodules=sub)


def train(args: argparse.Namespace, engine: Any, batch_loss: Callable[[Any, int, int], torch.Tensor],
          eval_loss: Callable[[Any, int, int], float], arm: str) -> dict:
    """The training loop: same data order in every arm, validation every ``--eval-interval`` steps, checkpoints.

    ``batch_loss(engine, index, micro)`` returns the loss of global micro-batch ``index`` for this data-parallel rank;
    ``eval_loss(engine, i, micro)`` the validation loss of validation batch ``i``.
    """
    from megatron.core import parallel_state

    from random_ltd.integrations.megatron import allreduce_sequence_parallel_grads

    last_saved = None  # the step of the newest tag in --save (never saved twice: tags are not rewritten)
    if args.load:
        path, _ = engine.load_checkpoint(args.load)
        if path is None and not args.allow_fresh_start:
            raise SystemExit(f"--load {args.load}: no checkpoint to resume from; pass --allow-fresh-start to start "
                             f"from step 0")
        if path is not None and args.save and os.path.realpath(args.save) == os.path.realpath(args.load):
            last_saved = engine.random_ltd_schedule.step
    rank = engine.global_rank
    dp_rank, dp_size = parallel_state.get_data_parallel_rank(), parallel_state.get_data_parallel_world_size()
    micro, gas = engine.train_micro_batch_size_per_gpu(), engine.gradient_accumulation_steps()
    sched = engine.random_ltd_schedule
    train_iters = args.train_iters
    if args.train_tokens is not None:
        train_iters = math.ceil(args.train_tokens / (engine.train_batch_size() * args.seq_length))

    def evaluate() -> float:
        engine.eval()
        with torch.no_grad():
            losses = [eval_loss(engine, i, micro) for i in range(args.eval_iters)]
        engine.train()
        return sum(losses) / len(losses)

    bar = None
    if rank == 0 and not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=train_iters, initial=sched.step, desc=arm, unit="step", dynamic_ncols=True)
        except ImportError:
            bar = None
    lrs = replayed_lrs(args, train_iters, engine.train_batch_size()) if args.lr_schedule_of else None
    curve, start, step, loss = [], time.perf_counter(), sched.step, torch.tensor(math.nan)
    step_lr: float | None = None
    while step < train_iters:
        if args.train_layer_tokens is not None and sched.consumed_layer_tokens >= args.train_layer_tokens:
            break
        if lrs is not None:
            for group in engine.optimizer.param_groups:
                group["lr"] = lrs[step]
        step_lr = engine.get_lr()[0]  # the LR this step runs at (schedulers set the next one inside engine.step)
        for mb in range(gas):
            loss = batch_loss(engine, (step * gas + mb) * dp_size + dp_rank, micro)
            engine.backward(loss)
            if args.sequence_parallel and engine.is_gradient_accumulation_boundary():
                allreduce_sequence_parallel_grads(engine.module)
            engine.step()
        step = sched.step
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", saved=f"{100 * sched.saved_fraction:.1f}%")
        if args.save and args.save_interval and step % args.save_interval == 0:
            engine.save_checkpoint(args.save)
            last_saved = step
        if step % args.eval_interval == 0 or step == train_iters:
            val = evaluate()
            curve.append({"step": step, "layer_tokens": sched.consumed_layer_tokens, "val_loss": val,
                          "train_loss": loss.item(), "lr": step_lr})
            if rank == 0:
                msg = (f"step {step:5d} | loss {loss.item():.4f} | val {val:.4f} | kept "
                       f"{engine.random_ltd_monitor.last.get('random_ltd/kept_length', 0):.0f} | saved "
                       f"{100 * sched.saved_fraction:.1f}% | lr {engine.get_lr()[0]:.2e}")
                (bar.write if bar is not None else print)(msg)
    wall = time.perf_counter() - start
    if bar is not None:
        bar.close()
    if args.save and last_saved != step:
        engine.save_checkpoint(args.save)
    if not curve or curve[-1]["step"] != step:
        curve.append({"step": step, "layer_tokens": sched.consumed_layer_tokens, "val_loss": evaluate(),
                      "train_loss": loss.item(), "lr": step_lr})
    result = {
        "arm": arm,
        "steps": sched.step,
        "consumed_layer_tokens": sched.consumed_layer_tokens,
        "baseline_layer_tokens": sched.baseline_layer_tokens,
        "saved_percent": 100 * sched.saved_fraction,
        "final_val_loss": curve[-1]["val_loss"],
        "wall_s": wall,
        "curve": curve,
        "world_size": engine.world_size,
        "tensor_model_parallel_size": args.tensor_model_parallel_size,
    }
    if rank == 0:
        print(engine.random_ltd_summary(), flush=True)
        if args.results:
            os.makedirs(os.path.dirname(os.path.abspath(args.results)), exist_ok=True)
            with open(args.results, "w") as f:
                json.dump(result, f, indent=1)
    return result
