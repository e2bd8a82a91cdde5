"""Run reports: seconds per stage and peak memory of a generation or an edit, freeing memory
between stages, and the training log (log.jsonl) with its loss plot."""

import gc
import json
import re
import resource
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import torch
from PIL import Image, ImageDraw

from .files import atomic_path


@dataclass
class Report:
    """Seconds and peak memory (GB) per stage of one run. Peaks: on CUDA (allocated, reserved)
    since the stage began; on the CPU (peak RSS, RSS at the end), reset per stage on Linux."""

    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, tuple[float, float]] = field(default_factory=dict)
    log: Callable[[str], None] = print

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (announced through `log`), then free what it left behind."""
        self.log(f"{name}...")
        reset_peak(self.device)
        start = time.perf_counter()
        yield
        if str(self.device).startswith("cuda"):
            torch.cuda.synchronize()
        self.seconds[name] = time.perf_counter() - start
        self.peaks[name] = peak_memory_gb(self.device), held_memory_gb(self.device)
        free(self.device)

    def __str__(self) -> str:
        what = "GPU" if str(self.device).startswith("cuda") else "RSS"
        stages = ", ".join(
            f"{k} {v:.1f}s ({what} peak {self.peaks[k][0]:.2f} GB)" for k, v in self.seconds.items()
        )
        return f"{stages}; total {sum(self.seconds.values()):.1f}s"


def free(device: str | torch.device) -> None:
    """Collect garbage and hand cached GPU memory back, so the next model fits."""
    gc.collect()
    if str(device).startswith("cuda"):
        torch.cuda.empty_cache()


def peak_memory_gb(device: str | torch.device = "cpu") -> float:
    """Peak GPU memory allocated on a CUDA device, else the peak resident memory of the process
    (since `reset_peak`)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    if (status := Path("/proc/self/status")).exists():
        return int(re.search(r"VmHWM:\s+(\d+)", status.read_text())[1]) / 2**20  # kB
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # kB on Linux


def held_memory_gb(device: str | torch.device = "cpu") -> float:
    """GPU memory reserved by PyTorch's allocator at its peak, else the process's RSS now."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_reserved(device) / 2**30
    if (status := Path("/proc/self/status")).exists():
        return int(re.search(r"VmRSS:\s+(\d+)", status.read_text())[1]) / 2**20
    return peak_memory_gb()


def reset_peak(device: str | torch.device = "cpu") -> None:
    """Start the peak counter of `peak_memory_gb` afresh (Linux: the kernel's peak RSS)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        Path("/proc/self/clear_refs").write_text("5")  # 5: reset the peak resident set size


def open_log(path: Path, step: int) -> TextIO:
    """Append to the jsonl log, first dropping lines past `step` (written by a killed run) and,
    with a warning, unreadable ones (a killed run's partial last line)."""
    lines, kept = path.read_text(errors="replace").splitlines() if path.exists() else [], []
    for n, line in enumerate(lines, start=1):
        try:
            kept += [line + "\n"] if line.strip() and json.loads(line)["step"] <= step else []
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}:{n}: dropped an unreadable line", stacklevel=2)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept))
    return open(path, "a")  # noqa: SIM115


def plot_losses(log: Path, png: Path, w: int = 800, h: int = 400, m: int = 50) -> None:
    """The loss per step (grey) and its running mean (blue), drawn with PIL."""
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    rows = [r for r in rows if "skipped" not in r]  # a skipped step's loss is not finite
    if len(rows) < 2:
        return
    steps, loss, mean = [r["step"] for r in rows], [r["loss"] for r in rows], []
    for v in loss:
        mean.append(v if not mean else 0.9 * mean[-1] + 0.1 * v)
    lo, hi, s0, s1 = min(loss), max(loss), steps[0], steps[-1]

    def xy(s: int, v: float) -> tuple[float, float]:
        x = m + (s - s0) / max(s1 - s0, 1) * (w - 2 * m)
        return x, h - m - (v - lo) / max(hi - lo, 1e-12) * (h - 2 * m)

    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m, w - m, h - m], outline="black")
    d.line([xy(s, v) for s, v in zip(steps, loss, strict=True)], fill=(170, 170, 170))
    d.line([xy(s, v) for s, v in zip(steps, mean, strict=True)], fill=(0, 70, 200), width=2)
    d.text((m, 15), f"loss at step {s1}: {loss[-1]:.4g} (running mean {mean[-1]:.4g})", "black")
    d.text((4, m), f"{hi:.3g}", "black"), d.text((4, h - m - 10), f"{lo:.3g}", "black")
    d.text((m, h - m + 6), str(s0), "black"), d.text((w - m - 40, h - m + 6), str(s1), "black")
    img.save(png)
