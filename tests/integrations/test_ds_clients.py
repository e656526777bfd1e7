"""Two DeepSpeed random-LTD clients, rewritten as tests with small models, run with only the import line changed.

The training code of each is DeepSpeedExamples' (``training/data_efficiency/gpt_finetuning/run_clm_no_trainer.py``
and ``vit_finetuning/main_cifar.py``): the same calls into ``deepspeed.initialize`` (real DeepSpeed, CPU, one
process), ``convert_to_random_ltd(model, LayerClass)``, ``model.random_ltd_scheduler.*`` and
``save_without_random_ltd``, and the same random-LTD config block as their ``ds_config_*_random_ltd.json`` (scaled
down). The one changed line is

    from deepspeed.runtime.data_pipeline.data_routing.helper import convert_to_random_ltd, save_without_random_ltd

which becomes the ``random_ltd.integrations.deepspeed.helper`` import below. What DeepSpeed's own random-LTD does
with these clients on CPU: the GPT-2 one fails in ``RandomLayerTokenDrop.forward`` (transformers 5 passes the mask
positionally), the ViT one has no CPU kernels.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from random_ltd.integrations.deepspeed.helper import convert_to_random_ltd, save_without_random_ltd  # the change
from random_ltd.schedules.mslg import deepspeed_fixed_linear

deepspeed = pytest.importorskip("deepspeed")
transformers = pytest.importorskip("transformers")

pytestmark = [
    pytest.mark.usefixtures("dist_env"),
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`:UserWarning"),
]


def client_args(config: dict, tmp_path: Path, name: str) -> argparse.Namespace:
    """What the clients' ``deepspeed.add_config_arguments(parser)`` + ``--deepspeed --deepspeed_config x`` give."""
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(config))
    parser = argparse.ArgumentParser()
    parser.add_argument("--local_rank", type=int, default=-1)
    parser = deepspeed.add_config_arguments(parser)
    return parser.parse_args(["--deepspeed", "--deepspeed_config", str(path)])


def random_ltd_block(*, layers: int, ids: list[int], mask: str | None, model_type: str, min_value: int,
                     max_value: int, require_steps: int, seq_per_step: int) -> dict:
    """The block of DeepSpeedExamples' ds_config_gpt_medium_random_ltd.json / the ViT one, with our sizes."""
    return {"enabled": True,
            "data_routing": {"enabled": True, "random_ltd": {
                "enabled": True, "total_layer_num": layers, "random_ltd_layer_num": len(ids),
                "random_ltd_layer_id": ids, "model_mask_name": mask, "model_type": model_type,
                "hidden_state_order": "batch_seq_dim",
                "random_ltd_schedule": {"min_value": min_value, "max_value": max_value,
                                        "schedule_type": "fixed_linear",
                                        "schedule_config": {"require_steps": require_steps,
                                                            "seq_per_step": seq_per_step}}}}}


# --------------------------------------------------------------------------------------------------------------------
# GPT-2: run_clm_no_trainer.py
# --------------------------------------------------------------------------------------------------------------------

GPT_L, BLOCK, VOCAB, MICRO, GAS = 4, 32, 48, 2, 2
GPT_MIN, GPT_REQUIRE, GPT_SEQ_STEP = 8, 6, 8


def gpt_config(tmp_path: Path) -> dict:
    # ds_config_gpt_medium_random_ltd.json: batch 4 = 2 x gas 2, Adam block, clipping, prescale, the random-LTD block
    return {"train_batch_size": MICRO * GAS, "train_micro_batch_size_per_gpu": MICRO, "steps_per_print": 10**9,
            "optimizer": {"type": "Adam", "params": {"lr": 1e-3, "betas": [0.8, 0.999], "eps": 1e-8,
                                                     "weight_decay": 3e-7, "torch_adam": True}},
            "zero_optimization": {"stage": 0}, "fp16": {"enabled": False}, "gradient_clipping": 1.0,
            "prescale_gradients": True, "wall_clock_breakdown": False,
            "csv_monitor": {"enabled": True, "output_path": str(tmp_path / "csv"), "job_name": "gpt"},
            "data_efficiency": random_ltd_block(layers=GPT_L, ids=[1, 2], mask="attention_mask", model_type="decoder",
                                                min_value=GPT_MIN, max_value=BLOCK, require_steps=GPT_REQUIRE,
                                                seq_per_step=GPT_SEQ_STEP)}


def tiny_gpt2(seed: int = 0):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=BLOCK, n_embd=32, n_layer=GPT_L, n_head=2, resid_pdrop=0.0,
                     embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg)


def lm_dataset(n: int, seed: int) -> list[dict]:
    """group_texts output: input_ids / attention_mask / labels blocks of BLOCK tokens (counting sequences)."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(0, VOCAB, (n, 1), generator=g)
    ids = (start + torch.arange(BLOCK)) % VOCAB
    return [{"input_ids": row, "attention_mask": torch.ones(BLOCK, dtype=torch.long), "labels": row.clone()}
            for row in ids]


def gpt_client(args, model, train_dataset, eval_dataset, max_train_steps: int, probe: list | None = None) -> dict:
    """``run_clm_no_trainer.training`` (random_ltd on, no curriculum, iteration LR), DeepSpeed calls unchanged."""
    from torch.utils.data import DataLoader, SequentialSampler
    from transformers import default_data_collator, get_scheduler
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    train_dataloader = DataLoader(train_dataset, collate_fn=default_data_collator,
                                  sampler=SequentialSampler(train_dataset), batch_size=MICRO)
    eval_dataloader = DataLoader(eval_dataset, collate_fn=default_data_collator, batch_size=MICRO)
    device = torch.device("cpu")

    def to_device(batch):
        return {k: v.to(device) for k, v in batch.items()}

    def evaluation(model, eval_dataloader):
        model.eval()
        losses = []
        for batch in eval_dataloader:
            with torch.no_grad():
                outputs = model(**to_device(batch))
            losses.append(outputs.loss.cpu().item())
        return math.exp(sum(losses) / len(losses))

    no_decay = ["bias", "LayerNorm.weight"]
    optimizer_grouped_parameters = [
        {"params": [p for n, p in model.named_parameters() if not any(nd in n for nd in no_decay)],
         "weight_decay": 0.0},
        {"params": [p for n, p in model.named_parameters() if any(nd in n for nd in no_decay)], "weight_decay": 0.0},
    ]
    optimizer = torch.optim.AdamW(optimizer_grouped_parameters, lr=5e-3)
    lr_scheduler = get_scheduler(name="constant_with_warmup", optimizer=optimizer, num_warmup_steps=0,
                                 num_training_steps=max_train_steps)
    model, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, args=args,
                                                             lr_scheduler=lr_scheduler, dist_init_required=True)
    model = convert_to_random_ltd(model, GPT2Block)
    random_ltd_layer_num = model.random_ltd_scheduler.get_random_ltd_layer_num()
    total_layer_num = model.random_ltd_scheduler.model_layer_num

    world_size = torch.distributed.get_world_size()
    total_tokens = max_train_steps * MICRO * GAS * BLOCK * world_size
    out = {"perplexity": [evaluation(model, eval_dataloader)], "reserved": [], "losses": [],
           "random_ltd_layer_num": random_ltd_layer_num, "total_layer_num": total_layer_num}
    global_step = micro_step = consumed_token = 0
    while consumed_token < total_tokens:
        model.train()
        for batch in train_dataloader:
            model.train()
            outputs = model(**to_device(batch))
            loss = outputs.loss
            model.backward(loss)
            actual_seq_length = BLOCK
            reserved_length = model.random_ltd_scheduler.get_current_seq()
            if probe is not None:
                probe.append(reserved_length)
            if reserved_length < actual_seq_length:
                actual_seq_length = (actual_seq_length * (total_layer_num - random_ltd_layer_num)
                                     + reserved_length * random_ltd_layer_num) // total_layer_num
            consumed_token += actual_seq_length * MICRO * world_size
            model.step()
            out["losses"].append(loss.item())
            micro_step += 1
            if micro_step % GAS == 0:
                global_step += 1
                out["reserved"].append(reserved_length)
            if consumed_token >= total_tokens:
                break
    out["perplexity"].append(evaluation(model, eval_dataloader))
    out["state_dict"] = save_without_random_ltd(model.module)
    out["engine"] = model
    out["global_step"] = global_step
    return out


def test_gpt2_run_clm_no_trainer_flow(tmp_path) -> None:
    from transformers import GPT2LMHeadModel

    cfg = gpt_config(tmp_path)
    train, evals = lm_dataset(64, seed=1), lm_dataset(8, seed=2)
    seen: list[int] = []
    model = tiny_gpt2()
    kept_in_layer: list[int] = []
    for layer in model.transformer.h:  # the body of a dropping layer sees the kept tokens only
        layer.ln_1.register_forward_hook(lambda m, a, o: kept_in_layer.append(a[0].shape[1]) if m.training else None)
    out = gpt_client(client_args(cfg, tmp_path, "gpt"), model, train, evals, max_train_steps=12, probe=seen)
    engine = out["engine"]

    assert out["random_ltd_layer_num"] == 2 and out["total_layer_num"] == GPT_L
    assert engine.random_ltd_enabled()
    # the schedule advances once per optimizer step, with DeepSpeed's fixed_linear values
    steps = out["global_step"]
    assert steps > GPT_REQUIRE  # grown to full length on the way
    expected = [deepspeed_fixed_linear(t, GPT_MIN, BLOCK, GPT_REQUIRE, GPT_SEQ_STEP) for t in range(steps)]
    assert out["reserved"] == expected
    # what the wrapped layers ran: full in layers 0 and 3, the scheduled length in 1 and 2, per micro-batch
    per_micro = [kept_in_layer[i:i + GPT_L] for i in range(0, len(kept_in_layer), GPT_L)]
    assert [row[1:3] for row in per_micro] == [[k, k] for k in seen]
    assert all(row[0] == row[3] == BLOCK for row in per_micro)
    # layer-tokens: what really ran in the completed optimizer steps (the client may stop mid-step)
    consumed = sum(MICRO * (2 * BLOCK + 2 * k) for k in seen[:steps * GAS])
    assert engine.random_ltd_scheduler.state["consumed_layer_tokens"] == consumed
    assert engine.random_ltd_schedule.saved_fraction > 0
    # training works and eval is the full model
    assert out["perplexity"][-1] < 0.5 * out["perplexity"][0], out["perplexity"]
    # metrics through DeepSpeed's monitor (the config's csv_monitor block)
    csv = tmp_path / "csv" / "gpt" / "random_ltd_kept_length.csv"
    assert csv.exists() and len(csv.read_text().strip().splitlines()) >= steps
    # save_without_random_ltd: loads strict into the plain model, same eval outputs
    plain = GPT2LMHeadModel(engine.module.config)
    plain.load_state_dict(out["state_dict"], strict=True)
    x = torch.stack([d["input_ids"] for d in evals])
    engine.module.eval()
    plain.eval()
    with torch.no_grad():
        assert torch.equal(plain(x).logits, engine.module(x).logits)


def test_gpt2_client_checkpoint_resumes_exactly(tmp_path) -> None:
    """engine.save_checkpoint / load_checkpoint (the clients' DeepSpeed calls) carry the random-LTD state."""
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    cfg = gpt_config(tmp_path)
    args = client_args(cfg, tmp_path, "gpt")
    data = lm_dataset(32, seed=3)

    def engine_for(seed: int):
        model = tiny_gpt2(seed)
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), args=args)
        return convert_to_random_ltd(engine, GPT2Block)

    def run(engine, first: int, steps: int) -> list[tuple[float, int]]:
        out = []
        for t in range(first, first + steps):
            for m in range(GAS):
                d = data[(t * GAS + m) % len(data)]
                batch = {k: v[None].repeat(MICRO, 1) for k, v in d.items()}
                loss = engine(**batch).loss
                engine.backward(loss)
                out.append((loss.item(), engine.random_ltd_scheduler.get_current_seq()))
                engine.step()
        return out

    straight = engine_for(0)
    run(straight, 0, 3)
    straight.save_checkpoint(str(tmp_path / "ckpt"), tag="t3")
    tail = run(straight, 3, 4)

    resumed = engine_for(1)  # other weights: everything must come from the checkpoint
    resumed.load_checkpoint(str(tmp_path / "ckpt"), tag="t3")
    assert resumed.random_ltd_schedule.step == 3
    assert resumed.random_ltd_scheduler.get_current_seq() == deepspeed_fixed_linear(3, GPT_MIN, BLOCK, GPT_REQUIRE,
                                                                                   GPT_SEQ_STEP)
    assert run(resumed, 3, 4) == tail
    assert resumed.random_ltd_scheduler.state_dict() == straight.random_ltd_scheduler.state_dict()


# --------------------------------------------------------------------------------------------------------------------
# ViT: main_cifar.py with a timm-style ViT whose blocks sit in nn.Sequential
# --------------------------------------------------------------------------------------------------------------------

IMG, PATCH, DIM, DEPTH, CLASSES, VIT_BATCH = 8, 2, 32, 4, 4, 16
TOKENS = (IMG // PATCH) ** 2 + 1  # 16 patches + [CLS]
VIT_MIN, VIT_REQUIRE = 5, 8


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
    """timm's ``vision_transformer.Block`` shape: x + attn(norm1(x)), x + mlp(norm2(x)); one positional input."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.patch_embed = nn.Conv2d(1, DIM, PATCH, PATCH)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, DIM))
        self.pos_embed = nn.Parameter(0.02 * torch.randn(1, TOKENS, DIM))
        self.blocks = nn.Sequential(*[Block(DIM) for _ in range(DEPTH)])
        self.norm = nn.LayerNorm(DIM)
        self.head = nn.Linear(DIM, CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 1:].mean(1))  # timm global_pool="avg"


def images(n: int, seed: int) -> torch.utils.data.TensorDataset:
    """Class = the brightness level of a noisy image (learnable in a few dozen steps by a tiny ViT)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, CLASSES, (n,), generator=g)
    x = 0.5 * torch.randn(n, 1, IMG, IMG, generator=g) + (y.float() - (CLASSES - 1) / 2)[:, None, None, None]
    return torch.utils.data.TensorDataset(x, y)


def vit_config(tmp_path: Path) -> dict:
    return {"train_batch_size": VIT_BATCH, "steps_per_print": 10**9,
            "zero_optimization": {"stage": 0}, "fp16": {"enabled": False},
            "data_efficiency": random_ltd_block(layers=DEPTH, ids=[1, 2], mask=None, model_type="encoder",
                                                min_value=VIT_MIN, max_value=TOKENS, require_steps=VIT_REQUIRE,
                                                seq_per_step=1)}


def test_vit_main_cifar_flow(tmp_path) -> None:
    args = client_args(vit_config(tmp_path), tmp_path, "vit")
    args.epochs, args.lr, args.momentum, args.wd, args.data_outdir = 4, 0.05, 0.9, 5e-4, str(tmp_path)
    tr_set, val_set = images(128, seed=1), images(64, seed=2)

    # main_cifar.main(), DeepSpeed calls unchanged (get_optimizer 'sgd', get_scheduler 'cosine')
    torch.manual_seed(0)
    train_loader = torch.utils.data.DataLoader(tr_set, batch_size=VIT_BATCH, shuffle=True)
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=VIT_BATCH * 2, shuffle=False)
    model = ViT()
    total_iteration = args.epochs * len(train_loader) + 1
    optimizer = torch.optim.SGD(model.parameters(), args.lr, momentum=args.momentum, weight_decay=args.wd)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, total_iteration)
    criterion = nn.CrossEntropyLoss()
    model, optimizer, _, lr_scheduler = deepspeed.initialize(model=model, optimizer=optimizer, args=args,
                                                             lr_scheduler=scheduler, dist_init_required=True)
    model = convert_to_random_ltd(model, Block)

    def validate(val_loader, model, criterion):
        model.eval()
        correct = total = 0
        with torch.no_grad():
            for x, target in val_loader:
                correct += (model(x).argmax(1) == target).sum().item()
                total += len(target)
        return correct / total

    kept_in_layer: list[int] = []
    for block in model.module.blocks:
        block.norm1.register_forward_hook(lambda m, a, o: kept_in_layer.append(a[0].shape[1]) if m.training else None)
    history = {"val_acc": [validate(val_loader, model, criterion)], "reserved": [], "layer_tokens": [], "lr": []}
    reserved_per_step: list[int] = []
    iterations = 0
    for _epoch in range(args.epochs):
        model.train()
        for x, target in train_loader:
            iterations += 1
            reserved_per_step.append(model.random_ltd_scheduler.get_current_seq())
            output = model(x)
            loss = criterion(output, target)
            model.backward(loss)
            model.step()
        history["val_acc"].append(validate(val_loader, model, criterion))
        history["layer_tokens"].append(model.random_ltd_scheduler.state["consumed_layer_tokens"])
        history["reserved"].append(model.random_ltd_scheduler.get_current_seq())
        history["lr"].append(lr_scheduler.get_last_lr()[0])
    torch.save(save_without_random_ltd(model), f"{args.data_outdir}/last_checkpoint.pt")

    # the blocks in nn.Sequential were wrapped (layers 1 and 2) and ran on the scheduled kept length
    assert model.random_ltd_enabled()
    expected = [deepspeed_fixed_linear(t, VIT_MIN, TOKENS, VIT_REQUIRE, 1) for t in range(iterations)]
    assert reserved_per_step == expected
    per_step = [kept_in_layer[i:i + DEPTH] for i in range(0, len(kept_in_layer), DEPTH)]
    assert per_step == [[TOKENS, k, k, TOKENS] for k in expected]
    assert history["layer_tokens"][-1] == sum(VIT_BATCH * (2 * TOKENS + 2 * k) for k in expected)
    assert history["reserved"][-1] == TOKENS
    # the client's own scheduler still drives the LR (no LayerToken LR in this config)
    assert history["lr"][0] > history["lr"][-1]
    assert history["val_acc"][-1] > max(0.8, history["val_acc"][0]), history["val_acc"]
    # the saved weights are the plain model's
    plain = ViT()
    plain.load_state_dict(torch.load(tmp_path / "last_checkpoint.pt"), strict=True)
    plain.eval()
    model.module.eval()
    x = val_set.tensors[0][:8]
    with torch.no_grad():
        assert torch.equal(plain(x), model.module(x))
