#!/usr/bin/env bash
# Ray for bench/train_ray_gpu.py on a GPU node whose image has torch/lightning but no Ray and no
# package index: Ray's python 3.12 wheel without what Train does not use (Java jars, RLlib, Serve,
# LLM, the dashboard's web client), plus those of Ray core's dependencies the image lacks (it has
# requests, filelock, pyyaml, packaging), as one xz tar (~30 MB) that fits a call's 64 MiB carry.
# Versions are constraints.txt's.
#
#   bash bench/carry_ray.sh .carry/ray                     # here
#   tar -xJf .carry/ray/ray_site.tar.xz -C /tmp/keep       # there; PYTHONPATH=/tmp/keep/site:...
set -euo pipefail
OUT=${1:?output folder}
WORK=$(mktemp -d)
pin() { grep -i -E "^$1==" constraints.txt; }
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any \
  -d "$WORK/wheels" $(for p in ray click jsonschema jsonschema-specifications attrs referencing msgpack protobuf rpds-py; do pin "$p"; done)
mkdir -p "$WORK/site" "$OUT"
for wheel in "$WORK"/wheels/*.whl; do python -m zipfile -e "$wheel" "$WORK/site"; done
rm -rf "$WORK"/site/ray/{jars,rllib,serve,llm,dashboard/client}
chmod +x "$WORK"/site/ray/core/src/ray/{gcs/gcs_server,raylet/raylet}  # zipfile drops the exec bits
tar -cf - -C "$WORK" site | xz -6 -T0 > "$OUT/ray_site.tar.xz"
rm -rf "$WORK"
ls -la "$OUT/ray_site.tar.xz"
