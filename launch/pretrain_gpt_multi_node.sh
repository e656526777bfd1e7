#!/usr/bin/env bash
# Multi-node with a hostfile (one line per node: "<host> slots=<processes>"), started from the first node:
#   HOSTFILE=hostfile bash launch/pretrain_gpt_multi_node.sh --deepspeed_config configs/tiny_gpt_cpu.json
# Without ssh between nodes, run on every node with its rank instead (what tests/integrations does on one machine):
#   NODE_RANK=0 MASTER_ADDR=10.0.0.1 NUM_NODES=2 bash launch/pretrain_gpt_multi_node.sh ...   (node 0)
#   NODE_RANK=1 MASTER_ADDR=10.0.0.1 NUM_NODES=2 bash launch/pretrain_gpt_multi_node.sh ...   (node 1)
set -euo pipefail
NPROC="${NPROC:-1}"
export LOCAL_SIZE="${LOCAL_SIZE:-$NPROC}"
script="$(dirname "$0")/${SCRIPT:-pretrain_gpt.py}"   # SCRIPT=pretrain_bert.py for BERT
if [[ -n "${NODE_RANK:-}" ]]; then
  exec deepspeed --no_ssh --num_nodes "${NUM_NODES:?set NUM_NODES}" --node_rank "$NODE_RANK" --num_gpus "$NPROC" \
    --master_addr "${MASTER_ADDR:?set MASTER_ADDR}" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
fi
exec deepspeed --hostfile "${HOSTFILE:?set HOSTFILE or NODE_RANK}" --master_port "${MASTER_PORT:-29500}" "$script" "$@"
