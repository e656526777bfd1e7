"""Markdown tables from the benchmarks' JSON: the README's step-time and op tables, and the GPU suite's summary.

    python benchmarks/report.py benchmarks/results/e2e_step_cpu.json benchmarks/results/ops_cpu.json
    python benchmarks/report.py OUTDIR                        # every *.json of a gpu_suite.sh run
    python benchmarks/report.py --suite steps.tsv --logs DIR --out OUTDIR OUTDIR    # what gpu_suite.sh calls

Every number printed comes from one of the files read, whose path is printed beside its table. With ``--suite``
it also writes ``OUTDIR/suite.json`` (each step's status, seconds, log tail; the CUDA test counts) and, with
``--out``, ``OUTDIR/gpu_table.md`` (the tables below, for README's GPU section).
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

#: exit statuses of a suite step and what they mean
STATUS = {"0": "ok", "124": "timeout", "137": "timeout (killed)", "3": "bound violation (see log)"}


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _num(v: float | None, fmt: str = ".2f") -> str:
    return "-" if v is None else format(v, fmt)


def load(paths: list[Path]) -> list[tuple[Path, dict[str, Any]]]:
    """``(path, data)`` of every benchmark JSON named, or found directly inside a named folder."""
    files: list[Path] = []
    for p in paths:
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    out = []
    for f in files:
        try:
            data = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: skipping {f}: {exc}", file=sys.stderr)
            continue
        if isinstance(data, dict) and data.get("benchmark") in ("e2e_step", "ops", "gpu_suite"):
            out.append((f, data))
    return out


def e2e_table(path: Path, d: dict[str, Any]) -> str:
    """Savings per kept length beside the LayerToken theory, the no-overhead bypass and the skip bound."""
    b = d["bounds"]
    env = d["env"]
    lines = [f"{d['model']}, {d['dtype']}, on {env['device']} (torch {env['torch']}; load average "
             f"{_num((env.get('load_average') or [None])[0], '.1f')}; {d.get('clock', 'wall')} clock; medians of "
             f"{d['iters']} interleaved rounds; "
             f"`{path}`)", "",
             f"full step {1e3 * b['full_step_s']:.1f} ms; skip (middle layers removed) saves {_pct(b['skip_saving'])} "
             f"of it (removes {_pct(b['skip_theoretical'])} of the layers), the bound no arm can beat.", "",
             "| kept | realized saving | no-overhead bypass | LayerToken theory | realized / theory "
             "| realized / bypass | random-LTD ops, % of step | minor faults / step (ltd) |",
             "|---|---|---|---|---|---|---|---|"]
    faults = {a["name"]: a["minor_faults"] for a in d["arms"]}
    for r in d["summary"]:
        realized = _pct(r["realized_saving"]) if r["realized_saving"] is not None else \
            f"{_pct(r.get('realized_saving_raw'))} (withheld: measurement bug)"
        lines.append(f"| {r['kept']} ({r['keep_ratio']:.4g}) | {realized} | {_pct(r['bypass_saving'])} | "
                     f"{_pct(r['theoretical_saving'])} | {_num(r['realized_over_theoretical'])} | "
                     f"{_num(r['realized_over_bypass'])} | {_pct(r['ops_overhead_of_step'])} | "
                     f"{faults.get('ltd@' + str(r['kept']), float('nan')):.0f} |")
    lines.append(f"\nfull arm: {faults.get('full', float('nan')):.0f} minor faults per step.")
    noisy = [f"{a['name']} {100 * a['spread']:.0f}%" for a in d["arms"] if (a.get("spread") or 0) > 0.2]
    if noisy:
        lines.append(f"Noisy arms (interquartile range / median > 20%, a loaded machine): {', '.join(noisy)}.")
    for e in d.get("errors", []):
        lines.append(f"\n**measurement error**: {e}")
    return "\n".join(lines)


def ops_table(path: Path, d: dict[str, Any]) -> str:
    """Gather/scatter bandwidth per backend, hot and cold, as a fraction of clone; then the per-call overhead."""
    lines = [f"token ops, bf16, on {d['device']} (torch {d['torch']}; cold = after flushing "
             f"{d.get('flush_bytes', 0) / 2**20:.0f} MiB, {d.get('cold_clock', 'wall')} clock; THP "
             f"{d.get('transparent_hugepages')}, torch THP_MEM_ALLOC_ENABLE={d.get('thp_mem_alloc_enable')}; "
             f"`{path}`)", "",
             "| op | shape [s,b,h] | keep | backend | hot GB/s | hot x clone | cold GB/s | cold x clone |",
             "|---|---|---|---|---|---|---|---|"]
    for r in d["results"]:
        if r["op"] == "sample":
            continue
        lines.append(f"| {r['op']} | {r['shape']} | {r['keep']} | {r['backend']} | {_num(r['gbps'], '.1f')} | "
                     f"{_num(r['vs_clone'])} | {_num(r.get('cold_gbps'), '.1f')} | {_num(r.get('cold_vs_clone'))} |")
    samples = [r for r in d["results"] if r["op"] == "sample"]
    if samples:
        lines += ["", "| sampler [layers,b,s] | keep | backend | time (us) |", "|---|---|---|---|"]
        lines += [f"| {r['shape']} | {r['keep']} | {r['backend']} | {r['time_us']:.1f} |" for r in samples]
    if d.get("overhead"):
        lines += ["", "| public op (tiny shape) | us per call | raw registered op (us) | overhead (us) |",
                  "|---|---|---|---|"]
        lines += [f"| `{o['public']}` | {o['public_us']:.2f} | {_num(o['raw_us'])} | {_num(o['overhead_us'])} |"
                  for o in d["overhead"]]
    if not d.get("deepspeed"):
        lines.append(f"\nDeepSpeed kernels not measured: {d.get('deepspeed_reason')}")
    return "\n".join(lines)


def junit_counts(path: Path) -> dict[str, int] | None:
    """tests / failures / errors / skipped of a pytest junit XML, or None when it is missing or unreadable."""
    try:
        root = ET.parse(path).getroot()
    except (OSError, ET.ParseError):
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    if suite is None:
        return None
    return {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}


def suite_record(steps_tsv: Path, logs: Path | None, out: Path, elapsed: int | None, budget: int | None
                 ) -> dict[str, Any]:
    """The suite's steps (from gpu_suite.sh's steps.tsv) with status, seconds and log tail."""
    steps = []
    for line in steps_tsv.read_text().splitlines():
        name, rc, seconds, cmd = (line.split("\t") + ["", "", ""])[:4]
        log = logs / f"{name}.log" if logs else None
        tail = log.read_text(errors="replace").splitlines()[-15:] if log and log.exists() else []
        steps.append({"name": name, "rc": rc, "status": STATUS.get(rc, rc if not rc.isdigit() else "failed"),
                      "seconds": int(seconds or 0), "command": cmd, "log_tail": tail})
    return {"benchmark": "gpu_suite", "elapsed_s": elapsed, "budget_s": budget, "steps": steps,
            "test_cuda": junit_counts(out / "test_cuda.xml")}


def suite_table(d: dict[str, Any]) -> str:
    lines = [f"gpu_suite: {d.get('elapsed_s')} s of a {d.get('budget_s')} s budget", "",
             "| step | status | seconds |", "|---|---|---|"]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} |" for s in d["steps"]]
    if d.get("test_cuda"):
        t = d["test_cuda"]
        lines.append(f"\ntests/ops/test_cuda.py: {t['tests']} tests, {t['failures']} failed, {t['errors']} errors, "
                     f"{t['skipped']} skipped")
        if t["tests"] and t["skipped"] == t["tests"]:
            lines.append("WARNING: every CUDA test skipped: no CUDA kernel ran (no GPU, or no CUDA extension; see the "
                         "build and info steps in suite.log)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="+", type=Path, help="benchmark JSON files or folders holding them")
    p.add_argument("--suite", type=Path, default=None, help="gpu_suite.sh's steps.tsv: write OUT/suite.json")
    p.add_argument("--logs", type=Path, default=None, help="folder of the suite's per-step logs")
    p.add_argument("--elapsed", type=int, default=None)
    p.add_argument("--budget", type=int, default=None)
    p.add_argument("--out", type=Path, default=None, help="folder for suite.json and gpu_table.md")
    args = p.parse_args(argv)

    sections = []
    if args.suite is not None:
        out = args.out or Path(".")
        record = suite_record(args.suite, args.logs, out, args.elapsed, args.budget)
        (out / "suite.json").write_text(json.dumps(record, indent=1) + "\n")
    tables = []
    for path, data in load(args.paths):
        if data["benchmark"] == "gpu_suite":
            sections.append(suite_table(data))
        elif data["benchmark"] == "e2e_step":
            tables.append(e2e_table(path, data))
        else:
            tables.append(ops_table(path, data))
    text = "\n\n".join(tables + sections) + "\n"  # the suite's step summary last: it ends the output
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "gpu_table.md").write_text("\n\n".join(tables) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
