#!/usr/bin/env bash
# A GPU session's checks, prepared for a machine lent for ~15 minutes (start included), in two
# calls of at most 10 minutes each. The machine is offline: diffusers comes as a wheel from .whl/
# (pip download diffusers --no-deps -d .whl), installed into /tmp/site, not the machine's Python.
#
#   bash benchmarks/gpu_session.sh infer OUT    # generation rows (~9 min): the issue-13 table
#   bash benchmarks/gpu_session.sh train OUT    # the gpu tests, then the training rows (~5 min)
#   bash benchmarks/gpu_session.sh tiny OUT     # both on the CPU with tiny models (a rehearsal)
#
# The gpu tests are named by file: the others import py360convert, which such a machine lacks.
set -uo pipefail
phase=${1:?infer, train or tiny}
out=${2:-gpu-out}
mkdir -p "$out"
if ls .whl/diffusers-*.whl >/dev/null 2>&1 && ! python -c "import diffusers" 2>/dev/null; then
    python -m pip install -q --no-index --no-deps --target /tmp/site .whl/diffusers-*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>/dev/null | tee "$out/gpu.txt"
GPU_TESTS="tests/test_offload.py tests/test_text.py tests/test_train_memory.py tests/test_fp8.py"
case $phase in
infer)
    python benchmarks/gpu.py --out "$out/gpu-bench" --budget 500 \
        --only none,diffusers,compile,fp8,blocks,model,fa3,edit,t5-fp8
    ;;
train)
    timeout 150 python -m pytest -m gpu -q $GPU_TESTS 2>&1 | tail -25 | tee "$out/pytest-gpu.txt"
    python benchmarks/gpu.py --out "$out/gpu-train" --budget 240 \
        --only train-bf16,train-fp8,train-fp8-blocks,train-bf16-keep
    ;;
tiny)
    python benchmarks/gpu.py --tiny --out "$out/gpu-tiny" --only none,compile,fp8,t5-fp8,train-fp8
    python -m pytest -q --collect-only -m gpu $GPU_TESTS | tail -1
    ;;
*)
    echo "unknown phase $phase: infer, train or tiny" >&2
    exit 2
    ;;
esac
