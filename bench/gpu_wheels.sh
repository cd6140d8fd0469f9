#!/usr/bin/env bash
# The wheels bench/gpu_check.sh --site-wheels needs on a GPU image that already holds CUDA
# torch and the scientific stack (the device image of docs/scaling.md: Python 3.12, x86-64):
# ray (without its Java jars, RLlib and ray.llm: 79 -> 45 MB), PyAV, open_clip and what they
# miss there. Two folders, each under one 64 MiB transfer with this repository:
#
#   bench/gpu_wheels.sh .gpuwheels        # -> .gpuwheels/a (PyAV, open_clip, ...), .gpuwheels/b (ray)
set -euo pipefail
OUT=${1:?usage: bench/gpu_wheels.sh OUT_DIR}
mkdir -p "$OUT/a" "$OUT/b"
download() {
  python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d "$@"
}
download "$OUT/a" av==18.1.0 open_clip_torch==3.3.0 ftfy wcwidth jsonschema \
  jsonschema-specifications referencing rpds-py pydantic pydantic-core annotated-types \
  typing-inspection tensorboardx
RAW=$(mktemp -d)
download "$RAW" ray==2.60.0
python3 - "$RAW"/ray-*.whl "$OUT/b" <<'PY'
import sys
import zipfile
from pathlib import Path

src, out = Path(sys.argv[1]), Path(sys.argv[2])
drop = ("ray/jars/", "ray/rllib/", "ray/llm/")  # Java workers, RLlib, Ray LLM: unused here
with zipfile.ZipFile(src) as zin, zipfile.ZipFile(out / src.name, "w", zipfile.ZIP_DEFLATED) as zout:
    for info in zin.infolist():  # ZipInfo kept: the executables (raylet, gcs_server) stay +x
        if info.filename.startswith(drop):
            continue
        data = zin.read(info)
        if info.filename.endswith(".dist-info/RECORD"):
            lines = data.decode().splitlines()
            data = "\n".join(l for l in lines if not l.startswith(drop)).encode()
        zout.writestr(info, data)
PY
rm -rf "$RAW"
du -sh "$OUT"/a "$OUT"/b
