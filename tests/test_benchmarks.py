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
    # Training rows between generation rows: they run in the order given.
    argv["gpu"] += ["--only", "none,diffusers,train-bf16,model,blocks,wrap1,diffusers-offload"]
    argv["gpu"][-1] += ",edit,train-fp8-blocks"  # the training rows: two memory modes
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
    ends = [json.loads(line)["label"] for line in (smoke["out"] / "results.jsonl").open()]
    assert sorted(ends) == sorted(GPU_ROWS + TRAIN_ROWS)  # each row saved once, as it ended
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


def test_gpu_session_script_parses(tmp_path):
    """The GPU session script is valid bash and refuses an unknown phase before any work."""
    script = Path(__file__).parents[1] / "benchmarks" / "gpu_session.sh"
    assert subprocess.run(["bash", "-n", str(script)]).returncode == 0
    r = subprocess.run(["bash", str(script), "infer", str(tmp_path / "o")], capture_output=True)
    assert r.returncode == 2 and b"unknown phase infer: run, later or tiny" in r.stderr
    assert not (tmp_path / "o").exists()


def gpu_bench(tmp_path: Path, *argv: str) -> subprocess.Popen:
    """gpu.py --tiny with its own weights and output folders, started."""
    args = ["--tiny", "--work", str(tmp_path / "w"), "--out", str(tmp_path / "out"), *argv]
    return subprocess.Popen(
        [sys.executable, "benchmarks/gpu.py", *args], cwd=ROOT, stdout=subprocess.PIPE, text=True
    )


def test_gpu_bench_cut_keeps_finished_rows(tmp_path):
    """A run killed after its first row (a device call's limit) has that row, whole, in
    results.json, results.jsonl and table.md; a run out of budget skips its rows cleanly."""
    out = tmp_path / "out"
    proc = gpu_bench(tmp_path, "--only", "none,blocks,train-fp8-blocks")
    for line in proc.stdout:
        if line.startswith("| dit360, offload none |"):
            break
    proc.kill()
    proc.wait()
    assert [json.loads(line)["key"] for line in (out / "results.jsonl").open()] == ["none"]
    results = json.loads((out / "results.json").read_text())
    assert list(results["rows"]) == ["none"] and "stages" in results["rows"]["none"]["result"]
    assert re.search(rf"\| dit360, offload none \| {NUMBER} \|", (out / "table.md").read_text())

    proc = gpu_bench(tmp_path, "--only", "none,train-fp8-blocks", "--budget", "0")
    assert proc.wait(timeout=300) == 0
    results = json.loads((out / "results.json").read_text())
    rows = [*results["rows"].values(), *results["train"].values()]
    assert [r["result"] for r in rows] == [dict(skipped="out of time (--budget 0 s)")] * 2


def test_gpu_bench_chooses_room(tmp_path):
    """The weights go to the first folder with room, with a 2-layer T5 where none holds the full
    one, to a folder that holds complete weights already before either; else one line."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    from gpu import choose_work

    a, b = tmp_path / "a", tmp_path / "b"
    needs = {24: 100, 2: 50}
    assert choose_work([a, b], needs, {a: 10, b: 2**31}, "w") == (b / "w", 24)
    assert choose_work([a, b], needs, {a: 2**30 + 60, b: 2**30 + 90}, "w") == (a / "w", 2)
    made = b / "w" / "flux" / "random-weights.json"
    made.parent.mkdir(parents=True)
    made.write_text(json.dumps({"sizes": {"t5": {"num_layers": 2}}}))
    assert choose_work([a, b], needs, {a: 2**31, b: 0}, "w") == (b / "w", 2)
    with pytest.raises(SystemExit, match=r"no folder has room .*/a: 0.0 GiB, .*/c: 0.0 GiB"):
        choose_work([a, tmp_path / "c"], needs, {a: 10, tmp_path / "c": 20}, "w")
