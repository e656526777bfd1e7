#!/usr/bin/env bash
# Single node: NPROC processes (GPUs; on CPU, LOCAL_SIZE processes) running launch/pretrain_gpt.py.
#   NPROC=8 bash launch/pretrain_gpt_single_node.sh --deepspeed_config configs/tiny_gpt_cpu.json [--baseline] ...
set -euo pipefail
NPROC="${NPROC:-2}"
export LOCAL_SIZE="${LOCAL_SIZE:-$NPROC}"   # read by DeepSpeed's CPU accelerator; ignored on GPUs
exec deepspeed --num_gpus "$NPROC" --master_port "${MASTER_PORT:-29500}" \
  "$(dirname "$0")/${SCRIPT:-pretrain_gpt.py}" "$@"   # SCRIPT=pretrain_bert.py for BERT
