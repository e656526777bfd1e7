#!/usr/bin/env bash
# One command for the first GPU: from a fresh checkout on the GPU box (Python 3.12, torch 2.11 CUDA 13, no network),
#   bash benchmarks/gpu_suite.sh OUTDIR
# installs the wheels in .whl/ (made here beforehand with `bash /work/shared/tools/offline-gpu-wheels.sh`; the box
# lacks deepspeed, pydantic, hjson and megatron-core), builds the CUDA extension (and DeepSpeed's RandomLTD kernels
# beside it, in the background), runs tests/ops/test_cuda.py, benchmarks/ops.py --device cuda and
# benchmarks/e2e_step.py --device cuda at the GPT-2-medium-like bf16 shape (24 layers, h 1024, s 2048; the plain
# PyTorch GPT, then megatron-core's GPTModel when it imports), and prints a summary table (benchmarks/report.py).
# Everything fits in 8 minutes: each step has its own timeout, cut to what is left of the budget, so a failing or
# hanging step costs only its own results. OUTDIR gets at most 7 files (the device tool returns 8):
#   suite.json (every step: rc, seconds, log tail; test counts; environment), suite.log (all logs), test_cuda.xml,
#   ops_cuda.json, e2e_step_cuda_plain.json, e2e_step_cuda_megatron.json, gpu_table.md (README's GPU table).
#
#   bash benchmarks/gpu_suite.sh --dry-run OUTDIR
# is the CPU rehearsal CI runs (tests/test_benchmarks.py): the same steps and code paths at tiny shapes on CPU, no
# wheels, no build (the extension already built or JIT), under a minute.
# Environment: PYTHON (default python3), SUITE_BUDGET_S (default 480), SUITE_CUDA_ARCHS (default 9.0).
set -uo pipefail

dry=0
if [ "${1:-}" = "--dry-run" ]; then dry=1; shift; fi
if [ $# -ne 1 ]; then echo "usage: bash benchmarks/gpu_suite.sh [--dry-run] OUTDIR" >&2; exit 2; fi
root=$(cd "$(dirname "$0")/.." && pwd)
mkdir -p "$1"
out=$(cd "$1" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$root"
py=${PYTHON:-python3}
budget=${SUITE_BUDGET_S:-480}
start=$(date +%s)
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
if [ $dry = 1 ]; then device=cpu; else device=cuda; fi
: > "$work/steps.tsv"

# run_step NAME TIMEOUT_S CMD...: runs CMD with its log in $work/NAME.log, cut to the budget left; records rc, seconds
run_step() {
    local name=$1 limit=$2; shift 2
    local left=$(( budget - ($(date +%s) - start) ))
    if [ "$left" -lt 5 ]; then
        echo "== $name: skipped, the ${budget}s budget is spent"
        printf '%s\t%s\t%s\t%s\n' "$name" "skipped" 0 "budget spent" >> "$work/steps.tsv"
        return 0
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    echo "== $name (timeout ${limit}s): $*"
    local t0 rc
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" > "$work/$name.log" 2>&1
    rc=$?
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$*" >> "$work/steps.tsv"
    tail -n 3 "$work/$name.log" | sed 's/^/   | /'
    echo "   rc=$rc after $(( $(date +%s) - t0 ))s"
    return 0
}

run_step env 30 bash -c "nvidia-smi 2>&1 || echo 'nvidia-smi: not available'; $py -c 'import sys, torch; \
print(sys.version); print(\"torch\", torch.__version__, \"cuda\", torch.version.cuda, torch.cuda.is_available())'; \
command -v nvcc && nvcc --version | tail -n 2; nproc"

if [ $dry = 0 ]; then
    if ls .whl/*.whl > /dev/null 2>&1; then
        run_step wheels 90 "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/site .whl/*.whl
        export PYTHONPATH="$PYTHONPATH:/tmp/site"
    else
        echo "== wheels: none in .whl/ (run bash /work/shared/tools/offline-gpu-wheels.sh before the call and carry .whl)"
        printf '%s\t%s\t%s\t%s\n' wheels missing 0 "no .whl/*.whl" >> "$work/steps.tsv"
    fi
    # DeepSpeed's RandomLTD kernels JIT-build with nvcc (a minute or two): beside our build, so ops.py finds them built
    ( run_step deepspeed_build 200 "$py" -c "from deepspeed.ops.op_builder import RandomLTDBuilder; \
RandomLTDBuilder().load(); print('deepspeed random_ltd kernels built')" > "$work/deepspeed_build.out" ) &
    ds_pid=$!
    run_step build 240 env RANDOM_LTD_FORCE_CUDA=1 RANDOM_LTD_CUDA_ARCHS="${SUITE_CUDA_ARCHS:-9.0}" \
        MAX_JOBS=8 "$py" setup.py build_ext --inplace
else
    ds_pid=
    echo "== build: skipped in the dry run (the extension already built, or JIT on first use)"
    printf '%s\t%s\t%s\t%s\n' build skipped 0 "dry run" >> "$work/steps.tsv"
fi
run_step info 60 "$py" -m random_ltd info
run_step test_cuda 120 "$py" -m pytest -q -p no:cacheprovider tests/ops/test_cuda.py --junitxml="$out/test_cuda.xml"
if [ -n "$ds_pid" ]; then wait "$ds_pid"; cat "$work/deepspeed_build.out"; fi

if [ $dry = 1 ]; then
    run_step ops 60 "$py" benchmarks/ops.py --device cpu --dry-run --out "$out/ops_cpu.json"
    e2e=(--device cpu --dry-run)
    tag=cpu
else
    run_step ops 150 "$py" benchmarks/ops.py --device cuda --out "$out/ops_cuda.json"
    e2e=(--device cuda --preset gpt2-medium --dtype bf16)
    tag=cuda
fi
run_step e2e_plain 120 "$py" benchmarks/e2e_step.py "${e2e[@]}" --model plain --out "$out/e2e_step_${tag}_plain.json"
if "$py" -c "import megatron.core" > /dev/null 2>&1; then
    run_step e2e_megatron 120 "$py" benchmarks/e2e_step.py "${e2e[@]}" --model megatron \
        --out "$out/e2e_step_${tag}_megatron.json"
else
    echo "== e2e_megatron: skipped, megatron.core does not import"
    printf '%s\t%s\t%s\t%s\n' e2e_megatron skipped 0 "megatron.core does not import" >> "$work/steps.tsv"
fi

for f in "$work"/*.log; do echo "===== $(basename "$f" .log)"; cat "$f"; done > "$out/suite.log"
"$py" benchmarks/report.py --suite "$work/steps.tsv" --logs "$work" --elapsed $(( $(date +%s) - start )) \
    --budget "$budget" --out "$out" "$out"
