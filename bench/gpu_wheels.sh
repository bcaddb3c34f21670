#!/usr/bin/env bash
# Downloads the wheels the GPU image lacks into .whl/ (gitignored), for bench/gpu.sh, which
# installs them there with `pip install --no-index --no-deps --target <tmp>` (no network there)
# and puts that folder on PYTHONPATH, leaving the image's torch alone. Run here, with PyPI access:
#
#   bash bench/gpu_wheels.sh           # then carry .whl: run(command="bash bench/gpu.sh", carry=[".whl"])
#
# The GPU image (Python 3.12, torch 2.11, torchvision, accelerate, timm, numpy, pillow, pyyaml,
# matplotlib, safetensors, tqdm, fsspec, scikit-learn ...) lacks only these of what the bench imports:
#   omegaconf + antlr4-python3-runtime  trainer/training/config.py imports omegaconf at module level
#   webdataset + braceexpand             shards/store.py, pipe: locations only (small, carried anyway)
# Deliberately not carried (the device tool carries 64 MiB at most):
#   wandb (20 MB wheel plus pydantic, sentry-sdk, gitpython ... it needs): the bench runs the trainer
#     with wandb.mode=disabled, and trainer/training/tracking/tracker.py imports wandb only when the mode is not disabled
#   mplfonts (85 MB, a CJK font): shards/plots.py looks for it only when a class name is not ASCII;
#     the bench's classes are class_000 ...
# Versions come from constraints.txt; all four are pure-Python (py3-none-any) wheels.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
DEST=${1:-.whl}
PACKAGES=(omegaconf antlr4-python3-runtime webdataset braceexpand)

specs=()
for name in "${PACKAGES[@]}"; do
  pin=$(grep -i "^${name}==" constraints.txt || true)
  [ -n "$pin" ] || { echo "bench/gpu_wheels.sh: $name is not pinned in constraints.txt" >&2; exit 1; }
  specs+=("$pin")
done
mkdir -p "$DEST"
for name in "${PACKAGES[@]}"; do  # one version of each: two would stop the whole install there
  norm=${name//-/_}
  find "$DEST" -maxdepth 1 -iname "${norm}-*.whl" ! -iname "${norm}-$(grep -i "^${name}==" constraints.txt | cut -d= -f3)-*" -delete
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$DEST" "${specs[@]}"
ls -l "$DEST"
du -ch "$DEST"/*.whl | tail -1
