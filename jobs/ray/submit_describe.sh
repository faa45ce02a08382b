#!/usr/bin/env bash
# Submit `leccr-pipe describe ARGS...` to a Ray cluster as a Ray job, with runtime_env.yaml
# (this checkout as the job's working_dir), and wait for it, tailing its log: exit 1 when the job
# failed (0 also when it was stopped: `ray job status ID`). Ctrl-C stops the tailing, not the job.
#   RAY_ADDRESS=http://HEAD:8265 jobs/ray/submit_describe.sh --input /shared/data --workdir /shared/runs/x ...
# RAY_ADDRESS is the head's dashboard (jobs server) URL. Inside the job, Ray sets RAY_ADDRESS to
# the cluster itself, so describe runs on that cluster. JOB_PYTHON: the Python on the cluster's
# nodes that has leccr-pipe's dependencies (default: `python` on the nodes' PATH).
# Tested by tests/test_ray_jobs.py.
set -euo pipefail
: "${RAY_ADDRESS:?set RAY_ADDRESS to the dashboard address of the head, e.g. http://head:8265}"
cd "$(dirname "$0")/../.."      # the project root: runtime_env.yaml's working_dir is "."
# `python -m pipelines.cli` (= leccr-pipe) runs the shipped copy of the code, not whatever
# version may be installed on the nodes.
exec ray job submit --runtime-env jobs/ray/runtime_env.yaml -- \
  "${JOB_PYTHON:-python}" -m pipelines.cli describe "$@"
