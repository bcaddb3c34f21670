#!/usr/bin/env bash
# The whole pipeline on the built-in digits dataset, on the CPU, with 2 training processes:
#   digits -> shards -> python -m trainer (2 gloo processes) -> evaluation
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
source .venv/bin/activate
python -m launch.make_shards --demo demo/digits-shards --overwrite
rm -rf runs/demo
# 2 processes whatever the cores: configs/demo.yaml's lr is tuned for their global batch of 64
python -m trainer --processes 2 --config configs/demo.yaml "$@"
python -m trainer.evaluate runs/demo
