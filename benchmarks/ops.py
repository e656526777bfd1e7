"""Bandwidth of the random-LTD token ops per backend, hot and cold, beside ``clone``, and each op's Python overhead.

    python benchmarks/ops.py [--device cpu|cuda] [--quick|--dry-run] [--out benchmarks/results/ops_<device>.json]

For each activation shape ``[s, b, h]`` (seq-first, Megatron's layout) and kept length ``k`` it times

* gather ``[s,b,h] -> [k,b,h]``: our extension (``torch.ops.random_ltd.gather_tokens``), the torch reference
  (``random_ltd/ops/reference.py``), ``torch.index_select`` over flattened rows, DeepSpeed's ``token_gather``;
* scatter (out of place): our extension, the reference (clone + ``scatter_``), ``clone`` + ``index_copy_``,
  DeepSpeed's ``clone`` + ``token_scatter_`` (how its ScatterTokens calls it);
* ``clone`` of the op's output-size tensor, the copy-bandwidth ceiling;
* the sampler: ours (``sample_sorted_indices_``), the reference, DeepSpeed's ``torch.multinomial`` + ``token_sort_``.

Two timings per function, interleaved over the backends:

* hot: blocks of back-to-back calls on the same buffers (fastest block, median beside it); inputs that fit in the
  last-level cache are then read from it, which is what a small-keep gather sees inside a layer only by luck;
* cold: each call timed alone right after writing a scratch buffer of twice the last-level cache (L3 on CPU, L2 on
  the GPU), so inputs and outputs start in memory; median of the calls.

GB/s counts the bytes an op must move at least: gather reads and writes ``k*b*h`` elements, scatter reads ``s*b*h``
(kept rows from y, the rest from x) and writes ``s*b*h``; every backend is credited with the same bytes, so GB/s
compare like time. Out of cache on CPU, gather of short rows is limited by 4 KiB pages (a TLB miss per row);
transparent huge pages (recorded in the JSON) help.

Per-call overhead: at a tiny shape (the kernels' own time negligible) each public op (``random_ltd.ops``) is timed
against the raw registered op it ends in (``torch.ops.random_ltd.*``); the difference is validation, backend
selection and autograd bookkeeping, paid once per op per layer per micro-batch.

DeepSpeed's kernels are GPU-only and used only when ``deepspeed`` imports and its RandomLTD op builds
(``RandomLTDBuilder().load()``); otherwise the reason is printed and recorded. They take int32 indices and cannot
sort sequences longer than ~2050 tokens (skipped there).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from benchmarks.common import MALLOC_ENV, environment, reexec_with_malloc_env, write_json  # noqa: E402
from random_ltd.ops import _extension  # noqa: E402
from random_ltd.ops import reference as ref  # noqa: E402


@dataclass
class Row:
    """One measurement: hot (fastest block, median block) and cold (median of flushed single calls)."""

    op: str
    shape: list[int]
    keep: int
    backend: str
    time_us: float
    median_us: float
    gbps: float | None
    vs_clone: float | None
    cold_us: float | None = None
    cold_gbps: float | None = None
    cold_vs_clone: float | None = None


@dataclass
class Overhead:
    """Per-call time of a public op and of the raw registered op it ends in, at a tiny shape."""

    op: str
    public: str
    public_us: float
    raw: str | None
    raw_us: float | None
    overhead_us: float | None


@dataclass
class Timing:
    """Fastest and median of the per-call times of several interleaved blocks."""

    best: float
    median: float


def last_level_cache_bytes(device: str) -> int:
    """L2 of the GPU, or the largest CPU cache sysfs reports (the L3), or 32 MiB when neither can be read."""
    if device == "cuda":
        props = torch.cuda.get_device_properties(torch.cuda.current_device())
        return int(getattr(props, "L2_cache_size", 0) or 64 * 2**20)
    best = 0
    for size in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = size.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        try:
            best = max(best, int(text.rstrip("KMG")) * scale)
        except ValueError:
            continue
    return best or 32 * 2**20


def measure_group(fns: dict[str, Callable[[], object]], block_time: float, rounds: int, clock: str = "wall"
                  ) -> dict[str, Timing]:
    """Per-call seconds of each function, hot: interleaved blocks of back-to-back calls (round-robin).

    Interleaving spreads interference from other processes over all backends alike; the fastest block is the least
    disturbed estimate (timeit's advice), the median is kept beside it. torch's Timer synchronises CUDA around
    each block. ``clock="process"`` (CPU) times each block by this process's CPU time instead of the wall clock.
    """
    def block(fn: Callable[[], object], n: int) -> float:
        if clock == "process":
            t0 = time.process_time()
            for _ in range(n):
                fn()
            return (time.process_time() - t0) / n
        return timers[fn].timeit(n).median

    timers: dict[Callable[[], object], Timer] = {}
    numbers = {}
    for name, fn in fns.items():
        for _ in range(3):  # warm-up: allocator, caches, lazy CUDA init
            fn()
        timers[fn] = Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
        once = block(fn, 1)
        numbers[name] = max(1, int(block_time / max(once, 1e-7)))
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            samples[name].append(block(fn, numbers[name]))
    return {name: Timing(min(v), statistics.median(v)) for name, v in samples.items()}


class Flusher:
    """Evicts the caches: writes a scratch buffer of ``nbytes`` (twice the last-level cache) before a timed call."""

    def __init__(self, device: str, nbytes: int) -> None:
        self.device = device
        self.scratch = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=device)
        self.value = 0

    def __call__(self) -> None:
        self.value = (self.value + 1) % 251
        self.scratch.fill_(self.value)


def measure_cold(fns: dict[str, Callable[[], object]], flush: Flusher, calls: int, clock: str = "wall"
                 ) -> dict[str, float]:
    """Median seconds of single calls, each right after a cache flush, interleaved over the functions.

    On CPU ``clock="process"`` times each call by this process's CPU time (with one thread, what the call used of
    the core, leaving out the time other jobs held it); on CUDA the calls are timed with events.
    """
    cuda = flush.device == "cuda"
    now = time.process_time if clock == "process" else time.perf_counter
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(calls):
        events = []
        for name, fn in fns.items():
            flush()
            if cuda:
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                events.append((name, start, end))
            else:
                t0 = now()
                fn()
                samples[name].append(now() - t0)
        if cuda:
            torch.cuda.synchronize()
            for name, start, end in events:
                samples[name].append(start.elapsed_time(end) / 1e3)
    return {name: statistics.median(v) for name, v in samples.items()}


def load_deepspeed(device: str) -> tuple[object | None, str | None]:
    """DeepSpeed's RandomLTD extension module, or None and the reason."""
    if device != "cuda":
        return None, "DeepSpeed's random_ltd kernels are CUDA-only"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            from deepspeed.ops.op_builder import RandomLTDBuilder

            return RandomLTDBuilder().load(), None
    except Exception as exc:  # any import or build failure: benchmark without it
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def bench_tokens(shape: tuple[int, int, int], keep: int, dtype: torch.dtype, device: str, ds, block_time: float,
                 rounds: int, ours: bool, flush: Flusher | None, cold_calls: int, clock: str = "wall") -> list[Row]:
    s, b, h = shape
    x = torch.randn(shape, device=device).to(dtype)
    out_idx = torch.empty(1, b, keep, dtype=torch.long, device=device)
    if ours:
        torch.ops.random_ltd.sample_sorted_indices_(out_idx, s, 1, 0, 0, 0)
    else:
        out_idx.copy_(ref.sample_sorted_indices(1, b, s, keep, seed=1, device=device))
    idx = out_idx[0]
    flat_rows = (idx.t() * b + torch.arange(b, device=device)).reshape(-1)  # row ids of [s*b, h], precomputed
    y = torch.randn(keep, b, h, device=device).to(dtype)
    esz = x.element_size()
    gather_bytes = 2 * keep * b * h * esz
    scatter_bytes = 2 * s * b * h * esz

    gather: dict[str, Callable[[], object]] = {
        "clone": lambda: y.clone(),
        "torch(reference)": lambda: ref.gather_tokens(x, idx, False),
        "index_select": lambda: x.view(s * b, h).index_select(0, flat_rows).view(keep, b, h),
    }
    scatter: dict[str, Callable[[], object]] = {
        "clone": lambda: x.clone(),
        "torch(reference)": lambda: ref.scatter_tokens(x, y, idx, False),
        "index_copy_": lambda: x.clone().view(s * b, h).index_copy_(0, flat_rows, y.view(keep * b, h)),
    }
    if ours:
        gather["random_ltd"] = lambda: torch.ops.random_ltd.gather_tokens(x, idx, False)
        scatter["random_ltd"] = lambda: torch.ops.random_ltd.scatter_tokens(x, y, idx, False)
    if ds is not None and x.dtype in (torch.float32, torch.float16, torch.bfloat16):
        idx32 = idx.to(torch.int32).contiguous()
        # DeepSpeed reinterprets every non-fp32 dtype as fp16: bf16 goes through an fp16 view (same bytes moved).
        xv, yv = (x, y) if x.dtype == torch.float32 else (x.view(torch.float16), y.view(torch.float16))
        gather["deepspeed"] = lambda: ds.token_gather(xv, idx32, False)
        scatter["deepspeed"] = lambda: ds.token_scatter_(xv.clone(), yv, idx32, False)

    rows = []
    for op, fns, nbytes in (("gather", gather, gather_bytes), ("scatter", scatter, scatter_bytes)):
        timings = measure_group(fns, block_time, rounds, clock)
        cold = measure_cold(fns, flush, cold_calls, clock) if flush is not None else {}
        clone_t, clone_cold = timings["clone"].best, cold.get("clone")
        for name, t in timings.items():
            c = cold.get(name)
            rows.append(Row(op, list(shape), keep, name, t.best * 1e6, t.median * 1e6, nbytes / t.best / 1e9,
                            clone_t / t.best, None if c is None else c * 1e6, None if c is None else nbytes / c / 1e9,
                            None if c is None else clone_cold / c))
    return rows


def bench_sampler(layers: int, b: int, s: int, keep: int, device: str, ds, block_time: float, rounds: int,
                  ours: bool, clock: str = "wall") -> list[Row]:
    out = torch.empty(layers, b, keep, dtype=torch.long, device=device)
    fns: dict[str, Callable[[], object]] = {
        "torch(reference)": lambda: ref.sample_sorted_indices(layers, b, s, keep, seed=3, step=1, device=device),
    }
    if ours:
        fns["random_ltd"] = lambda: torch.ops.random_ltd.sample_sorted_indices_(out, s, 3, 1, 0, 0)
    if ds is not None and s <= 2048:  # token_sort_'s shared bitmap overflows beyond ~2050 positions
        ones = torch.ones(layers * b, s, device=device)

        def deepspeed_sample() -> torch.Tensor:
            idx = torch.multinomial(ones, keep).reshape(layers, b, keep).to(torch.int32)
            return ds.token_sort_(idx, s)

        fns["deepspeed"] = deepspeed_sample
    timings = measure_group(fns, block_time, rounds, clock)
    return [Row("sample", [layers, b, s], keep, name, t.best * 1e6, t.median * 1e6, None, None)
            for name, t in timings.items()]


def bench_overhead(device: str, ours: bool, block_time: float, rounds: int, clock: str = "wall") -> list[Overhead]:
    """Per-call time of each public op against the raw registered op, at ``[s, b, h] = [16, 2, 64]``, keep 8."""
    from random_ltd.ops import (
        gather_positions,
        gather_tokens,
        sample_sorted_indices,
        scatter_tokens,
        select_backend,
        slice_attention_mask,
    )

    s, b, h, k = 16, 2, 64, 8
    x = torch.randn(s, b, h, device=device, dtype=torch.bfloat16)
    xg = x.clone().requires_grad_(True)
    y = torch.randn(k, b, h, device=device, dtype=torch.bfloat16)
    idx = ref.sample_sorted_indices(1, b, s, k, seed=5, device=device)[0]
    out = torch.empty(1, b, k, dtype=torch.long, device=device)
    mask = torch.ones(s, s, dtype=torch.bool).triu(1)[None, None].to(device)
    table = torch.randn(s, 1, 1, 32, device=device)
    raw = torch.ops.random_ltd if ours else None
    cases: list[tuple[str, str, Callable[[], object], str | None, Callable[[], object] | None]] = [
        ("gather", "gather_tokens(x, idx)", lambda: gather_tokens(x, idx, batch_first=False),
         "torch.ops.random_ltd.gather_tokens", raw and (lambda: raw.gather_tokens(x, idx, False))),
        ("gather", "gather_tokens(x, idx, check_indices=False)",
         lambda: gather_tokens(x, idx, batch_first=False, check_indices=False),
         "torch.ops.random_ltd.gather_tokens", raw and (lambda: raw.gather_tokens(x, idx, False))),
        ("gather", "gather_tokens(x requiring grad, idx, check_indices=False)",
         lambda: gather_tokens(xg, idx, batch_first=False, check_indices=False),
         "torch.ops.random_ltd.gather_tokens", raw and (lambda: raw.gather_tokens(x, idx, False))),
        ("scatter", "scatter_tokens(x, y, idx)", lambda: scatter_tokens(x, y, idx, batch_first=False),
         "torch.ops.random_ltd.scatter_tokens", raw and (lambda: raw.scatter_tokens(x, y, idx, False))),
        ("scatter", "scatter_tokens(x, y, idx, check_indices=False)",
         lambda: scatter_tokens(x, y, idx, batch_first=False, check_indices=False),
         "torch.ops.random_ltd.scatter_tokens", raw and (lambda: raw.scatter_tokens(x, y, idx, False))),
        ("sample", "sample_sorted_indices(1, b, s, k, seed=...)",
         lambda: sample_sorted_indices(1, b, s, k, seed=7, step=1, device=device),
         "torch.ops.random_ltd.sample_sorted_indices_",
         raw and (lambda: raw.sample_sorted_indices_(out, s, 7, 1, 0, 0))),
        ("mask", "slice_attention_mask([1,1,s,s], idx)", lambda: slice_attention_mask(mask, idx),
         "torch.ops.random_ltd.slice_attention_mask", raw and (lambda: raw.slice_attention_mask(mask, idx))),
        ("positions", "gather_positions([s,1,1,d], idx)", lambda: gather_positions(table, idx),
         "table[idx.t()].squeeze(2) (what it computes)", lambda: table[idx.t()].squeeze(2)),
        ("dispatch", "select_backend(device)", lambda: select_backend(device), None, None),
    ]
    fns: dict[str, Callable[[], object]] = {}
    for i, (_, _, public, _, raw_fn) in enumerate(cases):
        fns[f"p{i}"] = public
        if raw_fn is not None:
            fns[f"r{i}"] = raw_fn
    timings = measure_group(fns, block_time, rounds, clock)
    rows = []
    for i, (op, public_name, _, raw_name, raw_fn) in enumerate(cases):
        p_us = timings[f"p{i}"].best * 1e6
        r_us = timings[f"r{i}"].best * 1e6 if raw_fn is not None else None
        rows.append(Overhead(op, public_name, p_us, raw_name if raw_fn is not None else None, r_us,
                             None if r_us is None else p_us - r_us))
    return rows


def _f(v: float | None, fmt: str) -> str:
    return format(v, fmt) if v is not None else " " * len(format(0.0, fmt))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="smaller shapes and shorter timing (smoke run)")
    parser.add_argument("--dry-run", action="store_true",
                        help="tiny shapes, one round, small flush: rehearses every code path in seconds")
    parser.add_argument("--out", type=Path, default=None,
                        help="JSON path (default benchmarks/results/ops_<device>.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads for CPU runs (default: torch's); 1 gives stable numbers on a "
                             "shared, oversubscribed machine where OpenMP barriers wait on descheduled threads")
    parser.add_argument("--cold-calls", type=int, default=None, help="flushed single calls per function (default 7)")
    parser.add_argument("--flush-mib", type=float, default=None,
                        help="cache-flush scratch size (default: twice the last-level cache); 0 skips cold timing")
    parser.add_argument("--page-faults", action="store_true",
                        help="CPU: keep glibc's default allocator behaviour (large outputs page-faulted every call)")
    parser.add_argument("--thp", action="store_true",
                        help="CPU: back large tensors with transparent huge pages (torch's THP_MEM_ALLOC_ENABLE=1; "
                             "needs THP 'madvise' or 'always')")
    parser.add_argument("--clock", choices=["wall", "process"], default="wall",
                        help="CPU timings (hot blocks and cold calls): wall clock, or this process's CPU time (use "
                             "with --threads 1 on a machine shared with other jobs)")
    parser.add_argument("--cases", default=None,
                        help="token cases instead of the default set, e.g. '2048x8x2048:128,32768x1x1024:4096'")
    args = parser.parse_args(argv)
    device = args.device
    if device == "cpu" and not args.page_faults and argv is None:
        reexec_with_malloc_env({"THP_MEM_ALLOC_ENABLE": "1"} if args.thp else None)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but torch.cuda.is_available() is False")
    if device == "cuda" and args.clock == "process":
        parser.error("--clock process is for CPU runs; CUDA calls are timed with events")
    out_path = args.out or ROOT / "benchmarks" / "results" / f"ops_{device}.json"

    status = _extension.load()
    ours = status.loaded and (device == "cpu" or status.has_cuda)
    if not ours:
        print(f"random_ltd extension unavailable on {device}: {status.reason}")
    ds, ds_reason = load_deepspeed(device)
    if ds is None:
        print(f"DeepSpeed random_ltd kernels not benchmarked: {ds_reason}")
    small = args.quick or args.dry_run
    block_time, rounds = (0.002, 1) if args.dry_run else (0.02, 3) if args.quick else (0.05, 9)
    cold_calls = args.cold_calls or (1 if args.dry_run else 3 if args.quick else 7)
    llc = last_level_cache_bytes(device)
    flush_bytes = int(args.flush_mib * 2**20) if args.flush_mib is not None else (
        2**20 if args.dry_run else 2 * llc)
    flush = Flusher(device, flush_bytes) if flush_bytes > 0 else None

    if args.dry_run:
        token_cases = [((64, 2, 64), 8), ((64, 2, 64), 48)]
        sampler_cases = [(3, 2, 64, 8)]
    else:
        h_main = 512 if small else 2048
        token_cases = [((2048, 8, h_main), k) for k in (128, 512, 1024, 1920)]
        token_cases.append(((512, 32, 256 if small else 1024), 256))
        token_cases.append(((8192, 1, 1024) if small else (32768, 1, 1024), 1024 if small else 4096))
        sampler_cases = [(22, 8, 2048, 128), (22, 8, 2048, 1024), (22, 1, 32768, 4096)]
        if small:
            sampler_cases = sampler_cases[:2]
    if args.cases:
        try:
            token_cases = [(tuple(int(v) for v in shape.split("x")), int(keep))
                           for shape, keep in (c.split(":") for c in args.cases.split(","))]
        except ValueError:
            parser.error(f"--cases must look like '2048x8x2048:128,512x32x1024:256', got {args.cases!r}")
        if any(len(shape) != 3 or not 1 <= keep <= shape[0] for shape, keep in token_cases):
            parser.error(f"--cases: each shape is s x b x h and 1 <= keep <= s, got {args.cases!r}")

    rows: list[Row] = []
    started = time.time()
    for shape, keep in token_cases:
        rows += bench_tokens(shape, keep, torch.bfloat16, device, ds, block_time, rounds, ours, flush, cold_calls,
                             args.clock)
        print(f"  done {shape} keep {keep}", flush=True)
    for case in sampler_cases:
        rows += bench_sampler(*case, device, ds, block_time, rounds, ours, args.clock)
    overhead = bench_overhead(device, ours, max(block_time, 0.005), max(rounds, 3), args.clock)
    del flush

    env = environment(device)
    print(f"\nrandom_ltd token ops on {env['device']} (torch {torch.__version__}, bf16, {time.time() - started:.0f}s; "
          f"flush {flush_bytes / 2**20:.0f} MiB, last-level cache {llc / 2**20:.0f} MiB, THP "
          f"{env['transparent_hugepages']})")
    print("hot: fastest of the interleaved blocks (median beside it); cold: median of single calls after a flush "
          f"({args.clock if device == 'cpu' else 'wall / cuda events'} clock)")
    print(f"{'op':8} {'shape':>18} {'keep':>5} {'backend':>17} {'hot us':>9} {'median':>9} {'GB/s':>7} "
          f"{'x clone':>7} {'cold us':>9} {'GB/s':>7} {'x clone':>7}")
    for r in rows:
        print(f"{r.op:8} {str(r.shape):>18} {r.keep:>5} {r.backend:>17} {r.time_us:9.1f} {r.median_us:9.1f} "
              f"{_f(r.gbps, '7.1f')} {_f(r.vs_clone, '7.2f')} {_f(r.cold_us, '9.1f')} {_f(r.cold_gbps, '7.1f')} "
              f"{_f(r.cold_vs_clone, '7.2f')}")
    print("\nper-call Python overhead ([16, 2, 64] bf16, keep 8; fastest block):")
    print(f"{'public op':58} {'us':>7} {'raw us':>7} {'overhead':>8}")
    for o in overhead:
        print(f"{o.public:58} {o.public_us:7.2f} {_f(o.raw_us, '7.2f')} {_f(o.overhead_us, '8.2f')}")

    write_json(out_path, {
        **env,
        "benchmark": "ops",
        "malloc_env": {k: env["malloc_env"].get(k) for k in MALLOC_ENV},
        "dtype": "bfloat16",
        "quick": args.quick,
        "dry_run": args.dry_run,
        "clock": args.clock if device == "cpu" else "wall (torch Timer) hot, cuda events cold",
        "cold_clock": args.clock if device == "cpu" else "cuda events",
        "extension": {"loaded": status.loaded, "has_cuda": status.has_cuda, "source": status.source},
        "deepspeed": ds is not None,
        "deepspeed_reason": ds_reason,
        "last_level_cache_bytes": llc,
        "flush_bytes": flush_bytes,
        "bytes_note": "gather: 2*k*b*h*esize; scatter: 2*s*b*h*esize (minimum traffic, same for every backend)",
        "timing_note": f"hot: {rounds} interleaved blocks of ~{block_time * 1e3:.0f} ms per function; time_us = "
                       "fastest block, median_us = median block; gbps and vs_clone use the fastest. cold: median of "
                       f"{cold_calls} single calls per function, each after writing flush_bytes of scratch",
        "results": [asdict(r) for r in rows],
        "overhead": [asdict(o) for o in overhead],
    })
    print(f"\nwrote {out_path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
