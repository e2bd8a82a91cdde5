"""Session-wide test setup: offline Hugging Face access, the tiny FLUX.1-dev folder, and the
`scaled_mm_cpu` marker's capability probe."""

import functools
import os

# Before anything imports huggingface_hub: tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402
from tiny import write_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1-dev pipeline folder (Hugging Face layout), written once per session."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"))


@functools.cache
def cpu_scaled_mm_missing() -> str | None:
    """Why this torch's CPU cannot run a row-wise scaled torch._scaled_mm (it can from torch 2.12
    on: before, "only supports per-tensor scaling"), or None if it can; probed once."""
    a, row, col = (
        torch.ones(16, 16, dtype=torch.float8_e4m3fn),
        torch.ones(16, 1),
        torch.ones(1, 16),
    )
    try:
        torch._scaled_mm(a, a.t(), row, col, out_dtype=torch.bfloat16)
    except RuntimeError as e:  # a TORCH_CHECK's error; a wrong probe raises something else
        first = str(e).splitlines()[0]
        return f"torch {torch.__version__}'s CPU has no row-wise _scaled_mm (2.12 has): {first}"
    return None


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests marked `scaled_mm_cpu` are skipped, the probe's reason in the summary, where this
    torch's CPU has no row-wise _scaled_mm."""
    marked = [item for item in items if item.get_closest_marker("scaled_mm_cpu")]
    if marked and (why := cpu_scaled_mm_missing()):
        for item in marked:
            item.add_marker(pytest.mark.skip(reason=why))
