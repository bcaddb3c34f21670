#!/usr/bin/env bash
# The whole pipeline on the built-in digits dataset, on the CPU, with 2 training processes:
#   digits -> shards -> accelerate launch (2 gloo processes) -> evaluation
set -euo pipefail
cd "$(dirname "$0")/.."
bash launch/setup_env.sh
source .venv/bin/activate
python -m launch.make_shards --demo demo/digits-shards --overwrite
rm -rf runs/demo
ACCELERATE_USE_CPU=true accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no --dynamo_backend no \
  trainer/main.py --config configs/demo.yaml "$@"
python -m trainer.evaluate runs/demo
