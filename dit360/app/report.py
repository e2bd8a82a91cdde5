"""Run reports: seconds per stage and peak memory of a generation or an edit, freeing memory
between stages, and the training log (log.jsonl) with its loss plot (matplotlib) and tensorboard
events (both optional: `pip install 'dit360[logs]'`)."""

import gc
import json
import re
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import accumulate
from pathlib import Path
from typing import Any, TextIO

import torch

from ..load.files import atomic_path, parse_json

try:
    import resource
except ImportError:  # Windows
    resource = None


@dataclass
class Report:
    """Seconds and peak memory (GiB) per stage: CUDA (allocated, reserved) or CPU (peak RSS, RSS at
    the end). A stage run again (a batch's denoise per image) adds seconds, keeps larger peaks."""

    device: str = "cpu"
    seconds: dict[str, float] = field(default_factory=dict)
    peaks: dict[str, tuple[float, float]] = field(default_factory=dict)
    log: Callable[[str], None] = print
    counts: dict[str, int] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time a stage (announced through `log`), then free what it left behind."""
        self.log(f"{name}...")
        reset_peak(self.device)
        start = time.perf_counter()
        yield
        if gpu := backend(self.device):  # the GPU runs behind: its work done first
            gpu.synchronize()
        self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - start
        self.counts[name] = self.counts.get(name, 0) + 1
        now, was = (peak_memory_gb(self.device), held_memory_gb(self.device)), self.peaks.get(name)
        self.peaks[name] = now if was is None else (max(now[0], was[0]), max(now[1], was[1]))
        free(self.device)

    def __str__(self) -> str:
        what = "GPU" if str(self.device).startswith("cuda") else "RSS"
        times = {k: f" x{n}" if (n := self.counts.get(k, 1)) > 1 else "" for k in self.seconds}
        peaks = {k: f" ({what} peak {p[0]:.2f} GiB)" if p[0] else "" for k, p in self.peaks.items()}
        stages = ", ".join(f"{k}{times[k]} {v:.1f}s{peaks[k]}" for k, v in self.seconds.items())
        return f"{stages}; total {sum(self.seconds.values()):.1f}s"


def free(device: str | torch.device) -> None:
    """Collect garbage and hand cached GPU memory back, so the next model fits (MPS: to the
    unified memory the system shares)."""
    gc.collect()
    if gpu := backend(device):
        gpu.empty_cache()


def backend(device: str | torch.device) -> Any:
    """torch.cuda or torch.mps for a device of theirs (synchronize, empty_cache), else None."""
    kind = torch.device(device).type
    return getattr(torch, kind) if kind in ("cuda", "mps") else None


def peak_memory_gb(device: str | torch.device = "cpu") -> float:
    """Peak GPU memory allocated on CUDA, else the process's peak RSS (since `reset_peak`), GiB;
    0 where it is not known (Windows)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated(device) / 2**30
    if (peak := _status_gb("VmHWM")) is not None or resource is None:
        return peak or 0.0
    unit = 2**30 if sys.platform == "darwin" else 2**20  # ru_maxrss: bytes on macOS, kB on Linux
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / unit


def _status_gb(field: str) -> float | None:
    """A memory field of /proc/self/status in GiB; None without /proc."""
    if (status := Path("/proc/self/status")).exists():
        text = status.read_text(encoding="utf-8")
        return int(re.search(rf"{field}:\s+(\d+)", text)[1]) / 2**20  # kB
    return None


def held_memory_gb(device: str | torch.device = "cpu") -> float:
    """GPU memory reserved by PyTorch's allocator at its peak, else the process's RSS now (GiB)."""
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_reserved(device) / 2**30
    return _status_gb("VmRSS") or peak_memory_gb()


def reset_peak(device: str | torch.device = "cpu") -> None:
    """Start the peak counter of `peak_memory_gb` afresh (Linux: the kernel's peak RSS)."""
    if str(device).startswith("cuda"):
        # Before CUDA starts nothing is allocated, and "cuda:0" would not start it: an error.
        if torch.cuda.is_initialized():
            torch.cuda.reset_peak_memory_stats(device)
    elif Path("/proc/self/clear_refs").exists():
        # 5: reset the peak resident set size
        Path("/proc/self/clear_refs").write_text("5", encoding="utf-8")


def open_log(path: Path, step: int) -> TextIO:
    """Append to the jsonl log, less a killed run's lines past `step` and (warned) bad ones."""
    text = path.read_text(encoding="utf-8", errors="replace") if path.exists() else ""
    lines, kept = text.splitlines(), []
    for n, line in enumerate(lines, start=1):
        try:  # a row holds what plot_losses reads: a whole step and a loss
            row = parse_json(line, str(path)) if line.strip() else {}
            if row and (type(row["step"]), type(row["loss"])) != (int, float):
                raise TypeError
            kept += [line + "\n"] if row and row["step"] <= step else []
        except (ValueError, KeyError, TypeError):
            warnings.warn(f"{path}:{n}: dropped an unreadable line", stacklevel=2)
    with atomic_path(path) as tmp:
        tmp.write_text("".join(kept), encoding="utf-8")
    return open(path, "a", encoding="utf-8")  # noqa: SIM115


LOGS_EXTRA = "pip install 'dit360[logs]'"  # matplotlib and tensorboard, optional


def plot_losses(log: Path, png: Path) -> bool:
    """The loss per step and its running mean; False without matplotlib or two finite steps."""
    try:
        import matplotlib

        matplotlib.use("Agg")  # files only, no display
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    text = log.read_text(encoding="utf-8")
    rows = [json.loads(line) for line in text.splitlines() if line.strip()]
    rows = [r for r in rows if "skipped" not in r]  # a skipped step's loss is not finite
    if len(rows) < 2:
        return False
    steps, loss = [r["step"] for r in rows], [r["loss"] for r in rows]
    mean = list(accumulate(loss, lambda m, v: 0.9 * m + 0.1 * v))  # the running mean
    fig, ax = plt.subplots(figsize=(8, 4), dpi=100)
    ax.plot(steps, loss, color="0.7", linewidth=0.8, label="loss")
    ax.plot(steps, mean, color=(0, 0.27, 0.78), linewidth=1.5, label="running mean (0.9)")
    ax.set(xlabel="step", ylabel="loss", title=f"step {steps[-1]}: loss {loss[-1]:.4g}")
    ax.legend(loc="upper right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    with atomic_path(png) as tmp:
        fig.savefig(tmp, format="png")
    plt.close(fig)
    return True


def write_scalars(board: Any, metrics: dict[str, float | str], step: int) -> None:
    """A step's numeric metrics to a tensorboard SummaryWriter, as `train/<name>`."""
    for name, value in metrics.items():
        if isinstance(value, int | float):
            board.add_scalar(f"train/{name}", value, step)


def has_matplotlib() -> bool:
    """Whether `plot_losses` can draw."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def summary_writer() -> Any:
    """tensorboard's SummaryWriter class; ValueError naming the pip command without tensorboard."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError(
            f"--log tensorboard needs tensorboard: pip install tensorboard (or {LOGS_EXTRA})"
        ) from None
    return SummaryWriter
