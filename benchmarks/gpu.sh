#!/usr/bin/env bash
# Issue 6's GPU figures in one call of the device tool (a lent H100; 15 minutes of device time a session).
#
#   here:   benchmarks/gpu.sh fetch     wheels the device's image lacks, for its Python 3.12, into .whl/ (git-ignored)
#   there:  run(command="benchmarks/gpu.sh run", carry=[".whl"], timeout_s=560)
#
# `run` checks every Triton kernel on the GPU against its torch twin and times it (benchmarks/kernels_gpu.py: GB/s
# against the HBM peak), then times whole merges of the medium family, alloy --device cuda against mergekit --cuda
# (benchmarks/bench_merge.py). Results land in $OUT (kernels.txt, kernels.json, RESULTS.md, log.txt): copy them into
# benchmarks/RESULTS.md here. The image holds torch, triton, transformers, safetensors, peft, accelerate, click; it
# lacks pydantic (alloy's config and mergekit's) and mergekit with its few other needs, which the wheels bring.
set -euo pipefail
cd "$(dirname "$0")/.."

WHEELS=(
  pydantic==2.14.3 pydantic-core==2.50.4 annotated-types==0.8.0 typing-inspection==0.4.5
  mergekit==0.1.5 immutables==0.21 dill==0.4.1 pydot==4.0.1 gguf==0.19.0
)

case "${1:-}" in
fetch)
  rm -rf .whl && mkdir -p .whl
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 -d .whl "${WHEELS[@]}"
  ls .whl && du -sh .whl
  ;;
run)
  : "${OUT:?run this on the device machine, where OUT is set}"
  unset TRITON_INTERPRET
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD" PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
    python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
    timeout 180 python3 benchmarks/kernels_gpu.py --json "$OUT/kernels.json" | tee "$OUT/kernels.txt" || echo "kernels_gpu: rc $?"
    # the family is generated on the device's local disk (3 x 1.3 GB); 2 rounds a method keep the call in budget
    timeout 330 python3 benchmarks/bench_merge.py --device cuda --repeat 2 --root /tmp/alloy-bench \
      --out "$OUT/RESULTS.md" || echo "bench_merge: rc $?"
  } 2>&1 | tee "$OUT/log.txt"
  ;;
*)
  echo "usage: benchmarks/gpu.sh fetch|run" >&2
  exit 2
  ;;
esac
