"""The benchmarks still run (small sizes; their figures are printed, never asserted)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def run(*argv: str) -> str:
    r = subprocess.run([sys.executable, *argv], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout


def test_sample_speed_smoke():
    """The generation benchmark runs all three paths on a tiny model."""
    out = run("benchmarks/sample_speed.py", "--tiny")
    for row in ("dit360, wrap pad 1", "dit360, wrap pad 0", "diffusers FluxPipeline"):
        assert f"| {row} |" in out


def test_convert_memory_smoke(tmp_path):
    """The conversion-memory benchmark runs on a small synthetic checkpoint."""
    out = run("benchmarks/convert_memory.py", "--hidden", "256", "--workdir", str(tmp_path))
    assert "peak RSS converting to bf16" in out
