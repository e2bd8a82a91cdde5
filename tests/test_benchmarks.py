"""The benchmarks still run (small sizes; their figures are printed, never asserted)."""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import cpu_scaled_mm_missing

ROOT = Path(__file__).parents[1]
GPU_ROWS = (
    "dit360, offload none",
    "diffusers FluxPipeline, all on the device",
    "dit360, offload model",
    "dit360, offload blocks",
    "dit360, offload none, wrap pad 1",
    "diffusers, model CPU offload",
    "dit360 edit, half mask",
)
TRAIN_ROWS = ("train bf16, recompute", "train fp8 base, blocks streamed")
NUMBER = r"\d+\.\d+"


def run(*argv: str) -> str:
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


@pytest.fixture(scope="module")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """memory.py --small and gpu.py --tiny (2 rows at once), started together: both are mostly
    process start-ups and imports. The running processes, their logs, gpu.py's output folder."""
    tmp = tmp_path_factory.mktemp("bench")
    argv = {
        "memory": ["benchmarks/memory.py", "--small", "--workdir", str(tmp)],
        "gpu": ["benchmarks/gpu.py", "--tiny", "--jobs", "2", "--work", str(tmp / "gpu")],
    }
    argv["gpu"] += ["--out", str(tmp / "out")]
    # Not the compiled rows: a cold compile takes a minute on 2 cores (see tests/test_compile.py).
    argv["gpu"] += ["--only", "none,diffusers,model,blocks,wrap1,diffusers-offload,edit"]
    argv["gpu"][-1] += ",train-bf16,train-fp8-blocks"  # the training rows: two memory modes
    procs = {}
    for name, a in argv.items():  # output to files: a full pipe would stall a process not read yet
        with open(tmp / f"{name}.out", "w") as out, open(tmp / f"{name}.err", "w") as err:
            procs[name] = subprocess.Popen([sys.executable, *a], cwd=ROOT, stdout=out, stderr=err)
    yield dict(procs=procs, logs=tmp, out=tmp / "out")
    for p in procs.values():
        p.kill()
        p.wait()


def output(smoke: dict, name: str) -> str:
    """What one smoke run printed; it must have succeeded."""
    code = smoke["procs"][name].wait(timeout=600)
    assert code == 0, (smoke["logs"] / f"{name}.err").read_text()[-3000:]
    return (smoke["logs"] / f"{name}.out").read_text()


@pytest.mark.slow
def test_memory_small(smoke):
    """memory.py prints the stages of both generations, both forwards, and the modulation sizes."""
    out = output(smoke, "memory")
    for run_name in ("dit360 generate", "diffusers FluxPipeline"):
        for stage in ("text encoders", "denoise", "decode"):
            assert re.search(rf"\| {run_name} \| {stage} \| {NUMBER} \| {NUMBER} \|", out), out
    assert re.search(rf"ratio dit360 / diffusers: wall {NUMBER}, peak RSS {NUMBER}", out), out
    for impl in ("dit360", "diffusers"):
        assert re.search(rf"\| {impl} \| {NUMBER} \| {NUMBER} \| -?{NUMBER} \|", out), out
    assert re.search(rf"dit360 / diffusers: added peak {NUMBER}, time {NUMBER} \(fastest", out)
    assert re.search(rf"together {NUMBER} GiB of the transformer's {NUMBER} GiB", out), out
    assert re.search(rf"{NUMBER} MiB per step", out), out


@pytest.mark.slow
def test_gpu_tiny(smoke):
    """gpu.py --tiny runs every row on the CPU and writes its table and JSON."""
    out = output(smoke, "gpu")
    for label in GPU_ROWS:
        assert re.search(rf"\| {re.escape(label)} \| {NUMBER} \|", out), out
    assert re.search(r"\| dit360, offload none \|.*\| [\d.e+-]+ / (inf|[\d.]+) dB \|", out), out
    assert "SDPA on (1, 2, 552, 16) fp32: picks" in out
    results = json.loads((smoke["out"] / "results.json").read_text())
    assert [r["label"] for r in results["rows"].values()] == list(GPU_ROWS)
    table = (smoke["out"] / "table.md").read_text().splitlines()
    assert sum(line.startswith("| ") for line in table) == len(GPU_ROWS) + 1 + len(TRAIN_ROWS) + 1
    for label in TRAIN_ROWS:
        assert re.search(rf"\| {re.escape(label)} \| {NUMBER} \| \d+ \|", out), out
    assert [r["label"] for r in results["train"].values()] == list(TRAIN_ROWS)


def test_convert_memory_smoke(tmp_path):
    """The conversion-memory benchmark runs on a small synthetic checkpoint."""
    out = run("benchmarks/convert_memory.py", "--hidden", "256", "--workdir", str(tmp_path))
    assert "peak RSS converting to bf16" in out


@pytest.mark.slow
def test_fp8_small(tmp_path):
    """fp8.py --small prints the forward errors and seconds of each fp8 variant (W8A8 with fast
    and precise accumulation, or why this torch's CPU cannot run them) and the images' PSNR."""
    out = run("benchmarks/fp8.py", "--small", "--workdir", str(tmp_path))
    w8a8 = [f"fp8 W8A8 (torch._scaled_mm), {mode} accumulation" for mode in ("fast", "precise")]
    if cpu_scaled_mm_missing():  # this torch's CPU has no row-wise _scaled_mm: said, not run
        assert f"{w8a8[0]}: not measured, torch" in out, out
        w8a8 = []
    for row in ("bf16", "fp8 weight-only, bf16 activations", *w8a8):
        assert re.search(rf"\| {re.escape(row)} \| [\d.e+-]+ \| [\d.e+-]+ \| {NUMBER} \|", out), out
    assert bool(w8a8) == bool(re.search(r"fast vs precise accumulation on .*: outputs", out))
    assert re.search(
        rf"fp8 on vs off: mean abs [\d.e+-]+ \(0-255\), PSNR (inf|{NUMBER}) dB", out
    ), out


def test_gpu_session_script_parses():
    """The GPU session script is valid bash and refuses an unknown phase before any work."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script)], capture_output=True, text=True)
    assert r.returncode != 0 and "infer, train or tiny" in r.stderr
