#!/usr/bin/env bash
# Training benchmark at the paper's dimensions on one CUDA GPU, in under 5 minutes of wall time.
#
#   bash bench/train_gpu.sh                  # on the GPU machine, from anywhere
#   OUT=/some/dir bash bench/train_gpu.sh    # also writes the raw JSON to $OUT/train-results-cuda.json
#
# Needs python with torch (CUDA) and transformers; imports nothing of the project but
# leccr_core (no ray / vllm / decord). Each variant runs in a fresh process with its own time
# limit (torch.compile's longer); one that overruns or fails is recorded as failed and the rest
# go on. The JSON is rewritten after every variant, so even the outer timeout leaves what was
# measured. Afterwards, on the development machine:
#   .venv/bin/python bench/train.py --render path/to/train-results-cuda.json
# puts the numbers into docs/benchmarks.md.
#
# Knobs (environment): PYTHON (default: .venv/bin/python when present, else python3),
# DEVICE (cuda), STEPS (8), WARMUP (3), VARIANT_TIMEOUT (s per eager variant, 75),
# COMPILE_TIMEOUT (s for the torch.compile variant, 110), TOTAL_TIMEOUT (s, 280),
# EXTRA (more bench/train.py flags; DEVICE=cpu EXTRA=--tiny is a dry run anywhere).
set -euo pipefail
cd "$(dirname "$0")/.."

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
DEVICE=${DEVICE:-cuda}
STEPS=${STEPS:-8}
WARMUP=${WARMUP:-3}
VARIANT_TIMEOUT=${VARIANT_TIMEOUT:-75}
COMPILE_TIMEOUT=${COMPILE_TIMEOUT:-110}
TOTAL_TIMEOUT=${TOTAL_TIMEOUT:-280}
EXTRA=${EXTRA:-}
json_args=()
if [[ -n "${OUT:-}" ]]; then
  mkdir -p "$OUT"
  json_args=(--json-out "$OUT/train-results-$DEVICE.json")
fi

echo "== $(date -u +%FT%TZ) train bench on $DEVICE with $PYTHON" >&2
"$PYTHON" - <<'PY' >&2
import sys
sys.path.insert(0, ".")
import torch, transformers
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available(),
      "devices", torch.cuda.device_count(), "| transformers", transformers.__version__)
if torch.cuda.is_available():
    print("gpu:", torch.cuda.get_device_name(0))
import leccr_core.model, leccr_core.losses  # noqa: F401,E401  (must import without ray / vllm / decord)
PY

start=$SECONDS
rc=0
# The eager variants first (baseline first), the compile variant last: when time runs out, it
# is the one that goes missing.
timeout --signal=INT --kill-after=15 "$TOTAL_TIMEOUT" "$PYTHON" bench/train.py --device "$DEVICE" \
    --steps "$STEPS" --warmup "$WARMUP" --repeats 1 \
    --variant-timeout "$VARIANT_TIMEOUT" --compile-timeout "$COMPILE_TIMEOUT" \
    --variants baseline,cache,bf16,bf16+cache,bf16+cache+compile --no-docs "${json_args[@]}" $EXTRA || rc=$?
echo "== done in $((SECONDS - start)) s (exit $rc); JSON: bench/out/train-results-$DEVICE*.json ${json_args[*]:-}" >&2
exit $rc
