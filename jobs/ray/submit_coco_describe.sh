#!/usr/bin/env bash
# Example: describe COCO train2017 on a Ray cluster with one Qwen2-VL-7B engine per GPU.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the cluster's dashboard address, e.g. http://head:8265}"
ray job submit --runtime-env jobs/ray/runtime_env.yaml -- \
  leccr-pipe describe \
    --input /data/coco --annotations /data/coco/annotations/captions_train2017.json \
    --media-root /data/coco/train2017 --dataset coco \
    --workdir /data/runs/coco \
    --model Qwen/Qwen2-VL-7B-Instruct --max-model-len 8192 \
    --views-file jobs/describe/views-default.toml
