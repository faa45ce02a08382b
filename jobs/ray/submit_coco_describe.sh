#!/usr/bin/env bash
# Example: describe COCO train2017 on a GPU Ray cluster with one Qwen2-VL-7B engine per GPU
# (the vllm engine), as a Ray job. /data must be a mount that every node sees.
#   RAY_ADDRESS=http://head:8265 jobs/ray/submit_coco_describe.sh
# The same script with the openai engine and a tiny dataset runs in tests/test_ray_jobs.py.
set -euo pipefail
exec "$(dirname "$0")/submit_describe.sh" \
  --input /data/coco --annotations /data/coco/annotations/captions_train2017.json \
  --media-root /data/coco/train2017 --dataset coco \
  --workdir /data/runs/coco \
  --model Qwen/Qwen2-VL-7B-Instruct --max-model-len 8192 \
  --views-file jobs/describe/views-default.toml --no-progress
