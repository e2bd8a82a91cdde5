#!/usr/bin/env bash
# A GPU session's checks in ONE device call of at most 9.5 minutes on an H100 (a task is lent a
# machine for ~15 minutes in all, its start included). The numbers that matter most come first,
# and each row is saved the moment it ends, so a call cut short still returns what it measured.
#
# Before the call, here (the machine is offline; diffusers travels as a wheel in the git-ignored
# .whl/, installed there into /tmp/site, never into the machine's Python):
#
#   python -m pip download --no-deps -d .whl diffusers==0.42.1
#
# The call (the `device` tool's run; nothing else first, the machine starts with it):
#
#   run(command="bash benchmarks/gpu_session.sh run $OUT", carry=[".whl"], timeout_s=600)
#
# What comes back under $OUT: machine.txt (GPU, memory, disks, versions), pytest-gpu.txt (the
# gpu tests, bounded), gpu-bench/table.md, results.json and results.jsonl (benchmarks/gpu.py
# --plan first: dit360 vs diffusers, blocks, fp8 + --t5-fp8, compiled, compiled fp8, one fp8 +
# blocks training micro-batch). Put table.md, with the machine's name, in the README.
#
#   bash benchmarks/gpu_session.sh run OUT     # the one call above
#   bash benchmarks/gpu_session.sh later OUT   # the second plan (model, edit, bf16 training...)
#   bash benchmarks/gpu_session.sh tiny OUT    # the same flow on the CPU, tiny models: a rehearsal
#
# The rehearsal imitates the machine best under its versions (torch 2.11, transformers 5.17, no
# diffusers but the wheel, no py360convert, python3), e.g. in a venv made once:
#
#   python -m venv /tmp/gpu-venv && /tmp/gpu-venv/bin/pip install torch==2.11.0 \
#       transformers==5.17.0 safetensors sentencepiece einops pillow tqdm numpy huggingface_hub \
#       pytest protobuf peft requests regex
#   PATH=/tmp/gpu-venv/bin:$PATH bash benchmarks/gpu_session.sh tiny /tmp/rehearsal
#
# The gpu tests are named by file: three other test modules import py360convert, which the
# machine lacks. LIMIT (seconds, default 570) bounds the whole call; PYTHON (default python3).
set -uo pipefail
phase=${1:?run, later or tiny}
out=${2:-gpu-out}
PY=${PYTHON:-python3}
LIMIT=${LIMIT:-570}
GPU_TESTS="tests/test_offload.py tests/test_text.py tests/test_train_memory.py tests/test_fp8.py"
case $phase in
run | later) tiny="" ;;
tiny) tiny="--tiny" ;;
*)
    echo "unknown phase $phase: run, later or tiny" >&2
    exit 2
    ;;
esac
mkdir -p "$out"
if ls .whl/diffusers-*.whl >/dev/null 2>&1 && ! $PY -c "import diffusers" 2>/dev/null; then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi
{
    echo "# $(date -u) phase $phase"
    nvidia-smi --query-gpu=name,memory.total,memory.free,driver_version --format=csv 2>&1
    free -g
    df -h /dev/shm "${TMPDIR:-/tmp}" /var/tmp . 2>&1
    $PY -c "import sys, torch, transformers; print('python', sys.version.split()[0], 'torch',
torch.__version__, 'cuda', torch.version.cuda, 'transformers', transformers.__version__)"
    $PY -c "import diffusers; print('diffusers', diffusers.__version__)" 2>&1 | tail -1
} 2>&1 | tee "$out/machine.txt"
bench() { # gpu.py with what is left of LIMIT, less a margin for its report
    $PY benchmarks/gpu.py $tiny --out "$out/gpu-bench" --budget $((LIMIT - SECONDS - 20)) "$@"
}
if [ "$phase" = later ]; then
    bench --plan later 2>&1 | tee "$out/gpu-later.txt"
    exit "${PIPESTATUS[0]}"
fi
# The weights are written while the gpu tests run (neither is timed), then the first plan.
bench --prepare-only >"$out/prepare.txt" 2>&1 &
prep=$!
if [ -n "$tiny" ]; then
    $PY -m pytest -q --collect-only -m gpu $GPU_TESTS 2>&1 | tail -1 | tee "$out/pytest-gpu.txt"
else
    timeout 100 $PY -m pytest -m gpu -q -p no:cacheprovider $GPU_TESTS 2>&1 | tail -25 |
        tee "$out/pytest-gpu.txt"
fi
if ! wait $prep; then
    cat "$out/prepare.txt"
    echo "error: writing the weights failed (above)" >&2
    exit 1
fi
echo "[$SECONDS s] weights ready: $(tail -1 "$out/prepare.txt")"
bench --plan first 2>&1 | tee "$out/gpu-first.txt"
exit "${PIPESTATUS[0]}"
