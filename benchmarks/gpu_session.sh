#!/usr/bin/env bash
# One prepared GPU run (device tool, H100/H200; about 10 minutes): the gpu-marked tests, the
# kernel table, and offline throughput of a Llama-3-8B-shaped model. Results land in $OUT.
# Here, first:   ../shared/device/wheels.sh   (carry .whl)
# Device call:   bash benchmarks/gpu_session.sh      (carry [".whl"], timeout_s 600)
set -uo pipefail
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD || exit 1
export PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jax_cache
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/device.txt"
python3 -c "import jax; print(jax.__version__, jax.devices())" | tee -a "$OUT/device.txt"
timeout 150 python3 -m pytest -q -m gpu tests/kernels 2>&1 | tail -30 | tee "$OUT/gpu_tests.txt"
timeout 150 python3 benchmarks/kernels.py --json "$OUT/kernels.json" 2>&1 | tee "$OUT/kernels.txt"
timeout 240 python3 benchmarks/throughput.py --model-config llama3-8b --workload 1024/128 \
  --num-prompts 256 --max-num-seqs 256 --max-num-batched-tokens 8192 --scheduling both \
  --compilation-cache /tmp/jax_cache --json "$OUT/throughput.json" 2>&1 | tail -40 \
  | tee "$OUT/throughput.txt"
