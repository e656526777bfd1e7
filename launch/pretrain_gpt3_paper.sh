#!/usr/bin/env bash
# The paper's GPT-3 recipes (random-LTD, sec. 4.1 / App. D.1): seq 2048, kept length 128 -> 2048 in steps of 16, full
# after 210B of 300B tokens, the first and last of 24 layers always full (30.3% of all layer-tokens saved; 33.0% of the
# 22 dropping layers', the paper's "1/3"), dropout 0.1, LayerToken LR (App. C: warmup 9,437,184,000 layer-tokens =
# s*l*B*375 (1.3B) or s*l*B*750 (350M), linear decay to 0 over the run's own consumption). --baseline: nothing dropped,
# the config's iteration WarmupDecayLR. Megatron indexed data and a GPU node required.
#   SIZE=350m DATA=/data/pile_gpt2_text_document NPROC=8 bash launch/pretrain_gpt3_paper.sh [--baseline] [...]
#   SIZE=1.3b ... (1.3B: hidden 2048; 350M: hidden 1024)      HOSTFILE=hostfile for several nodes
set -euo pipefail
SIZE="${SIZE:-350m}"
case "$SIZE" in
  350m) MODEL=(--num-layers 24 --hidden-size 1024 --num-attention-heads 16) ;;
  1.3b) MODEL=(--num-layers 24 --hidden-size 2048 --num-attention-heads 16) ;;
  *) echo "SIZE must be 350m or 1.3b" >&2; exit 2 ;;
esac
ARGS=(--deepspeed_config "$(dirname "$0")/../configs/ds_gpt3_${SIZE}_random_ltd.json" "${MODEL[@]}"
      --seq-length 2048 --train-tokens 300000000000 --data-path "${DATA:?set DATA to a Megatron indexed dataset prefix}"
      --vocab-size "${VOCAB_SIZE:-50304}" --eval-interval 1000 --eval-iters 10 --save "${SAVE:-checkpoints/gpt3_$SIZE}"
      --save-interval 5000 --hidden-dropout "${DROPOUT:-0.1}" --attention-dropout "${DROPOUT:-0.1}")
if [[ -n "${HOSTFILE:-}" ]]; then
  exec bash "$(dirname "$0")/pretrain_gpt_multi_node.sh" "${ARGS[@]}" "$@"
fi
NPROC="${NPROC:-8}" exec bash "$(dirname "$0")/pretrain_gpt_single_node.sh" "${ARGS[@]}" "$@"
