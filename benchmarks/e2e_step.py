"""Training-step time with random-LTD against its bounds: full length, middle layers skipped, and a no-overhead bypass.

    python benchmarks/e2e_step.py                                   # megatron-core GPT, CPU shape (L8 h256 s512 b4)
    python benchmarks/e2e_step.py --model plain                     # plain-PyTorch GPT, no megatron-core needed
    python benchmarks/e2e_step.py --device cuda --preset gpt2-medium --model plain   # L24 h1024 s2048 bf16
    python benchmarks/e2e_step.py --dry-run                         # tiny shapes, seconds: rehearses every path

Arms, timed interleaved (each round runs every arm once, so drift on a shared machine hits them alike), medians:

* ``full``: every layer at full length (the baseline);
* ``skip``: the middle layers removed entirely (first and last layer only): the physical bound of any saving;
* ``ltd@k``: random-LTD, the middle layers (all but the first and last) keep ``k`` random sorted tokens;
* ``bypass@k``: the middle layers run on the contiguous first ``k`` tokens (one slice before them, one
  concatenation after): the same work as ``ltd@k`` without sampling, gather or scatter, the no-overhead bound;
* ``ops@k``: random-LTD's own ops alone, forward and backward, for every middle layer (sample + gather + rotary
  gather + scatter at the model's shape, the layer replaced by identity): its overhead, reported as % of ``ltd@k``.

Each step is forward + backward + AdamW, timed by the wall clock (``--clock process``: this process's CPU time, the
measure to use with ``--threads 1`` on a machine shared with other jobs). Savings are ``1 - t(arm)/t(full)``; the
LayerToken theory is ``1 - (2s + (L-2)k) / (Ls)``. A saving above ``skip``'s (or ``skip`` above ``(L-2)/L``) is
physically impossible: it is printed as a measurement error, kept in the JSON only as ``*_raw`` with the reason, and
the exit status is 3.

On CPU the process re-executes itself under ``benchmarks.common.MALLOC_ENV`` (glibc keeps freed memory instead of
unmapping every block of 32 MiB or more), so no arm pays page faults in steady state; minor faults per step are
printed per arm to show it (``--page-faults`` keeps glibc's default to see the artefact).
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks.common import environment, malloc_env_active, minor_faults, reexec_with_malloc_env, write_json  # noqa: E402
from benchmarks.gpt_stack import PlainGPT, rotary_table  # noqa: E402

#: shapes: the CPU default (the README's), the GPU suite's GPT-2-medium-like one, and the rehearsal's tiny one
PRESETS: dict[str, dict[str, int]] = {
    "cpu": {"num_layers": 8, "hidden_size": 256, "num_attention_heads": 8, "seq_length": 512, "micro_batch_size": 4,
            "vocab_size": 256},
    "gpt2-medium": {"num_layers": 24, "hidden_size": 1024, "num_attention_heads": 16, "seq_length": 2048,
                    "micro_batch_size": 4, "vocab_size": 50304},
    "dry-run": {"num_layers": 4, "hidden_size": 64, "num_attention_heads": 4, "seq_length": 64,
                "micro_batch_size": 2, "vocab_size": 128},
}
#: minor faults per step above which a CPU arm is said to measure the allocator
FAULT_WARNING = 1000
#: interquartile range over median above which an arm's times are called noisy
NOISE_WARNING = 0.2


@dataclass
class Bench:
    """A model ready to time: ``step(arm_kind, k)`` configures the arm; ``forward()`` returns the loss."""

    model: nn.Module
    state: Any
    forward: Callable[[], torch.Tensor]
    configure: Callable[[str, int], None]
    rotary: torch.Tensor
    description: str


def _plain(args: argparse.Namespace, dtype: torch.dtype) -> Bench:
    from random_ltd import RandomLTDConfig, convert_to_random_ltd

    L, s, b, device = args.num_layers, args.seq_length, args.micro_batch_size, args.device
    torch.manual_seed(0)
    model = PlainGPT(L, args.hidden_size, args.num_attention_heads, args.vocab_size, s).to(device=device, dtype=dtype)
    model.rotary = model.rotary.float()  # angles stay fp32 (cast after cos/sin), as Megatron's table
    model.train()
    state = convert_to_random_ltd(model, layers=model.layers,
                                  config=RandomLTDConfig(total_layer_num=L, hidden_state_order="seq_batch_dim"))
    ids = torch.randint(0, args.vocab_size, (b, s), device=device)

    def configure(kind: str, k: int) -> None:
        model.mode = {"skip": "skip", "bypass": ("bypass", k)}.get(kind, "layers")

    return Bench(model, state, lambda: model(ids, ids), configure, model.rotary,
                 f"plain-PyTorch GPT (pre-LN, RoPE, SDPA causal) L={L} h={args.hidden_size} s={s} b={b}")


class _MegatronBypass(nn.Module):
    """Megatron ``TransformerBlock`` stand-in for the middle layers: run them on the first ``k`` tokens."""

    def __init__(self, layers: list[nn.Module], k: int) -> None:
        super().__init__()
        self.mid = nn.ModuleList(layers)
        self.k = k
        self.layer_number = layers[0].layer_number

    def forward(self, hidden_states: torch.Tensor, rotary_pos_emb: torch.Tensor | None = None, **kwargs):
        k = self.k
        hk = hidden_states[:k]
        rot = rotary_pos_emb[:k] if isinstance(rotary_pos_emb, torch.Tensor) else rotary_pos_emb
        for layer in self.mid:
            hk, _ = layer(hidden_states=hk, rotary_pos_emb=rot, **kwargs)
        return torch.cat([hk, hidden_states[k:]], dim=0), kwargs.get("context")


def _megatron(args: argparse.Namespace, dtype: torch.dtype) -> Bench:
    import torch.distributed as dist
    from megatron.core import parallel_state, tensor_parallel

    import random_ltd.integrations.megatron  # noqa: F401 - CPU shim when CUDA is absent

    if not dist.is_initialized():
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(port))
        dist.init_process_group("nccl" if args.device == "cuda" else "gloo", rank=0, world_size=1)
    parallel_state.initialize_model_parallel(1, 1)
    tensor_parallel.model_parallel_cuda_manual_seed(0)
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_config import TransformerConfig

    from random_ltd import RandomLTDConfig
    from random_ltd.integrations.megatron import gpt_layer_specs
    from random_ltd.layers import convert_to_random_ltd

    L, s, b, device = args.num_layers, args.seq_length, args.micro_batch_size, args.device
    cfg = TransformerConfig(num_layers=L, hidden_size=args.hidden_size, num_attention_heads=args.num_attention_heads,
                            use_cpu_initialization=device == "cpu", hidden_dropout=0.0, attention_dropout=0.0,
                            bf16=dtype == torch.bfloat16, params_dtype=dtype)
    model = GPTModel(cfg, gpt_layer_specs(L), vocab_size=args.vocab_size, max_sequence_length=s,
                     position_embedding_type="rope").to(device).train()
    state = convert_to_random_ltd(model, config=RandomLTDConfig(total_layer_num=L, hidden_state_order="seq_batch_dim"))
    ids = torch.randint(0, args.vocab_size, (b, s), device=device)
    pos = torch.arange(s, device=device)[None].expand(b, s)
    block = model.decoder
    layers = block.layers
    variants: dict[tuple[str, int], nn.ModuleList] = {}

    def configure(kind: str, k: int) -> None:
        key = (kind, k if kind == "bypass" else 0)
        if kind == "skip" and key not in variants:
            variants[key] = nn.ModuleList([layers[0], layers[-1]])
        elif kind == "bypass" and key not in variants:
            variants[key] = nn.ModuleList([layers[0], _MegatronBypass(list(layers[1:-1]), k), layers[-1]])
        block.layers = variants.get(key, layers)

    return Bench(model, state, lambda: model(ids, pos, None, labels=ids).float().mean(), configure,
                 rotary_table(s, args.hidden_size // args.num_attention_heads, device=device),
                 f"megatron-core GPTModel (local spec, RoPE) L={L} h={args.hidden_size} s={s} b={b}")


def _ops_step(bench: Bench, mid_ids: list[int], x: torch.Tensor, grad: torch.Tensor, k: int) -> None:
    """random-LTD's own work for one micro-batch, forward and backward, the layers replaced by identity."""
    from random_ltd.ops import gather_positions, gather_tokens, scatter_tokens

    state, (s, b, _) = bench.state, x.shape
    h = x
    for lid in mid_ids:
        idx = state.indices(lid, b, s, k, x.device)
        kept = gather_tokens(h, idx, batch_first=False, check_indices=False)
        gather_positions(bench.rotary, idx)
        h = scatter_tokens(h, kept, idx, batch_first=False, check_indices=False)
    h.backward(grad)
    x.grad = None


def arms_for(seq_len: int, ratios: list[float]) -> list[tuple[str, str, int]]:
    """``(name, kind, kept)`` of every arm: full, skip, then ltd/bypass/ops per kept length below ``seq_len``."""
    kept = sorted({max(1, min(seq_len, round(r * seq_len))) for r in ratios} - {seq_len})
    arms = [("full", "ltd", seq_len), ("skip", "skip", 0)]
    for k in kept:
        arms += [(f"ltd@{k}", "ltd", k), (f"bypass@{k}", "bypass", k), (f"ops@{k}", "ops", k)]
    return arms


def spread(values: list[float]) -> float | None:
    """Interquartile range over median: how much the machine disturbed an arm (None below 2 samples)."""
    if len(values) < 2:
        return None
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


def check_bounds(summary: list[dict[str, Any]], skip_saving: float, num_layers: int) -> list[str]:
    """Move every saving above ``skip``'s (and a ``skip`` above (L-2)/L) to ``*_raw`` with the reason; the errors."""
    errors = []
    physical = (num_layers - 2) / num_layers
    inflated = skip_saving > physical
    if inflated:
        errors.append(f"skip saves {100 * skip_saving:.1f}% > {100 * physical:.1f}% = (L-2)/L, the share of the "
                      "layers it removes: the full-length arm is slowed by something other than the layers "
                      "(page faults? load?), so no saving of this run is reported")
    for row in summary:
        for key in ("realized_saving", "bypass_saving"):
            value = row.get(key)
            if value is None:
                continue
            if inflated:
                reason = (f"skip's saving {100 * skip_saving:.1f}% exceeds (L-2)/L = {100 * physical:.1f}%: the "
                          "full-length arm is inflated, a measurement bug")
            elif value > skip_saving:
                reason = f"{key} {100 * value:.1f}% > skip's {100 * skip_saving:.1f}%: impossible, a measurement bug"
                errors.append(f"kept {row['kept']}: {reason}")
            else:
                continue
            row[f"{key}_raw"] = value
            row[key] = None
            row["bound_violation"] = reason
            # ratios built on a withheld saving are withheld with it
            for ratio in ("realized_over_theoretical", "realized_over_bypass"):
                if row.get(ratio) is not None:
                    row[f"{ratio}_raw"], row[ratio] = row[ratio], None
    return errors


def summarize(times: dict[str, list[float]], faults: dict[str, list[int]], arms: list[tuple[str, str, int]],
              num_layers: int, seq_len: int) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Per-kept-length savings, ratios and overheads from the per-arm step times (medians)."""
    med = {name: statistics.median(v) for name, v in times.items()}
    full, skip = med["full"], med["skip"]
    L, s = num_layers, seq_len
    summary = []
    for k in sorted({k for _, kind, k in arms if kind == "ltd" and k < s}):
        ltd, bypass, ops = med[f"ltd@{k}"], med[f"bypass@{k}"], med[f"ops@{k}"]
        theory = 1 - (2 * s + (L - 2) * k) / (L * s)
        realized, bypass_saving = 1 - ltd / full, 1 - bypass / full
        summary.append({
            "kept": k, "keep_ratio": k / s, "theoretical_saving": theory, "realized_saving": realized,
            "bypass_saving": bypass_saving, "realized_over_theoretical": realized / theory if theory > 0 else None,
            "realized_over_bypass": realized / bypass_saving if bypass_saving > 0 else None,
            "ops_overhead_of_step": ops / ltd, "ltd_minus_bypass_of_step": (ltd - bypass) / ltd,
        })
    bounds = {"skip_saving": 1 - skip / full, "skip_theoretical": (L - 2) / L, "full_step_s": full}
    return summary, bounds


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _ratio(v: float | None) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_tables(result: dict[str, Any]) -> None:
    """The per-arm table and the per-kept-length saving table (markdown)."""
    print(f"\n{result['model']} {result['dtype']} on {result['env']['device']}")
    print(f"malloc env: {result['malloc_env_active']}; {result['clock']} clock; medians of {result['iters']} "
          "interleaved rounds "
          f"(after {result['warmup']} warm-up)")
    print("| arm | kept | step (ms) | spread (IQR / median) | minor faults / step |"
          + (" peak MiB |" if result["device"] == "cuda" else ""))
    print("|---|---|---|---|---|" + ("---|" if result["device"] == "cuda" else ""))
    for a in result["arms"]:
        mem = f" {a['peak_mib']:.0f} |" if a.get("peak_mib") is not None else ""
        print(f"| {a['name']} | {a['kept']} | {1e3 * a['step_s']:.2f} | {_pct(a['spread'])} | "
              f"{a['minor_faults']:.0f} |{mem}")
    b = result["bounds"]
    print(f"\nskip (middle layers removed) saves {_pct(b['skip_saving'])} (removes {_pct(b['skip_theoretical'])} of "
          "the layers): no arm can save more")
    print("| kept | realized saving | no-overhead bypass | LayerToken theory | realized / theory | realized / bypass "
          "| random-LTD ops, % of step | ltd - bypass, % of step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in result["summary"]:
        print(f"| {r['kept']} ({r['keep_ratio']:.4g}) | {_pct(r['realized_saving'])} | {_pct(r['bypass_saving'])} | "
              f"{_pct(r['theoretical_saving'])} | {_ratio(r['realized_over_theoretical'])} | "
              f"{_ratio(r['realized_over_bypass'])} | {_pct(r['ops_overhead_of_step'])} | "
              f"{_pct(r['ltd_minus_bypass_of_step'])} |")
    for err in result["errors"]:
        print(f"ERROR: {err}")
    for warn in result["warnings"]:
        print(f"WARNING: {warn}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--model", default="megatron", choices=["megatron", "plain"],
                   help="megatron-core GPTModel with random-LTD specs, or the plain-PyTorch GPT (no megatron-core)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="shape preset (default: cpu); explicit shape flags override it")
    p.add_argument("--dry-run", action="store_true", help="tiny shapes, 1 warm-up + 2 rounds: rehearse every path")
    for name in PRESETS["cpu"]:
        p.add_argument(f"--{name.replace('_', '-')}", type=int, default=None)
    p.add_argument("--ratios", default="0.0625,0.25,0.5", help="kept ratios of the middle layers (full is implied)")
    p.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 2; 3 on cuda; 1 dry-run)")
    p.add_argument("--iters", type=int, default=None, help="timed rounds (default 5; 10 on cuda; 2 dry-run)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on cuda, fp32 on cpu")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU)")
    p.add_argument("--page-faults", action="store_true", help="CPU: keep glibc's default allocator (the artefact)")
    p.add_argument("--clock", default="wall", choices=["wall", "process"],
                   help="what a step's time is: wall clock, or this process's CPU time (user + system, all threads; "
                        "with --threads 1 on a loaded machine it leaves out the time other jobs held the core)")
    p.add_argument("--out", default=None, help="JSON path")
    args = p.parse_args(argv)
    if args.device == "cpu" and not args.page_faults and argv is None:
        reexec_with_malloc_env()
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda but torch.cuda.is_available() is False")
    if args.device == "cuda" and args.clock == "process":
        p.error("--clock process measures host CPU time; on cuda use the wall clock (the default)")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    preset = PRESETS["dry-run" if args.dry_run else args.preset or "cpu"]
    for name, value in preset.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    warmup = args.warmup if args.warmup is not None else (1 if args.dry_run else 3 if args.device == "cuda" else 2)
    iters = args.iters if args.iters is not None else (2 if args.dry_run else 10 if args.device == "cuda" else 5)
    dtype_name = args.dtype or ("bf16" if args.device == "cuda" else "fp32")
    dtype = torch.bfloat16 if dtype_name == "bf16" else torch.float32
    ratios = [float(r) for r in args.ratios.split(",") if r.strip()]
    if not ratios or any(not 0 < r <= 1 for r in ratios):
        p.error(f"--ratios must be comma-separated numbers in (0, 1], got {args.ratios!r}")

    bench = (_megatron if args.model == "megatron" else _plain)(args, dtype)
    fused = args.device == "cuda"
    opt = torch.optim.AdamW(bench.model.parameters(), lr=1e-4, **({"fused": True} if fused else {}))
    L, s, b, hid = args.num_layers, args.seq_length, args.micro_batch_size, args.hidden_size
    mid_ids = list(range(1, L - 1))
    arms = arms_for(s, ratios)
    ops_x = torch.randn(s, b, hid, device=args.device, dtype=dtype, requires_grad=True)
    ops_grad = torch.randn(s, b, hid, device=args.device, dtype=dtype)

    def sync() -> None:
        if args.device == "cuda":
            torch.cuda.synchronize()

    times: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    wall: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in arms}
    faults: dict[str, list[int]] = {name: [] for name, _, _ in arms}
    peaks: dict[str, int] = {}
    started = time.time()
    for it in range(warmup + iters):
        for step, (name, kind, k) in enumerate(arms):
            bench.configure(kind, k)
            bench.state.advance(it * len(arms) + step, {i: k for i in mid_ids} if kind in ("ltd", "ops") else {})
            if args.device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            sync()
            f0, c0, t0 = minor_faults(), time.process_time(), time.perf_counter()
            if kind == "ops":
                bench.state.begin_micro_batch()
                _ops_step(bench, mid_ids, ops_x, ops_grad, k)
            else:
                bench.forward().backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            sync()
            elapsed, cpu_s, nfaults = time.perf_counter() - t0, time.process_time() - c0, minor_faults() - f0
            count = bench.state.finish_step()
            if kind == "ltd" and count.consumed != b * (2 * s + (L - 2) * k):
                raise RuntimeError(f"{name}: random-LTD ran {count.consumed} layer-tokens, expected "
                                   f"{b * (2 * s + (L - 2) * k)}: the layers did not drop as configured")
            if it >= warmup:
                wall[name].append(elapsed)
                cpu[name].append(cpu_s)
                times[name].append(cpu_s if args.clock == "process" else elapsed)
                faults[name].append(nfaults)
                if args.device == "cuda":
                    peaks[name] = torch.cuda.max_memory_allocated()
        bench.configure("ltd", s)

    summary, bounds = summarize(times, faults, arms, L, s)
    errors = check_bounds(summary, bounds["skip_saving"], L)
    warnings = []
    arm_rows = []
    for name, kind, k in arms:
        row = {"name": name, "kind": kind, "kept": k, "step_s": statistics.median(times[name]),
               "step_s_all": times[name], "spread": spread(times[name]),
               "wall_s": statistics.median(wall[name]), "process_s": statistics.median(cpu[name]),
               "minor_faults": statistics.median(faults[name]),
               "peak_mib": peaks[name] / 2**20 if name in peaks else None}
        arm_rows.append(row)
        if row["spread"] is not None and row["spread"] > NOISE_WARNING:
            warnings.append(f"{name}: step times spread {100 * row['spread']:.0f}% (IQR / median): a loaded machine")
        if args.device == "cpu" and row["minor_faults"] > FAULT_WARNING:
            warnings.append(f"{name}: {row['minor_faults']:.0f} minor faults per step: its time includes page faults")
    result = {
        "benchmark": "e2e_step", "model": bench.description, "model_kind": args.model, "device": args.device,
        "dtype": dtype_name, "num_layers": L, "hidden_size": hid, "num_attention_heads": args.num_attention_heads,
        "seq_length": s, "micro_batch_size": b, "vocab_size": args.vocab_size, "warmup": warmup, "iters": iters,
        "dry_run": args.dry_run, "clock": args.clock, "malloc_env_active": malloc_env_active(),
        "env": environment(args.device),
        "wall_s": time.time() - started, "arms": arm_rows, "bounds": bounds, "summary": summary,
        "errors": errors, "warnings": warnings,
        "notes": "savings 1 - t(arm)/t(full) of medians; skip = middle layers removed (bound); bypass = middle layers "
                 "on the first k tokens (no-overhead bound); ops = sample+gather+rotary gather+scatter fwd+bwd of "
                 "every middle layer, as a share of the ltd step",
    }
    print_tables(result)
    if args.out:
        print(f"wrote {write_json(args.out, result)}")
    return 3 if errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
