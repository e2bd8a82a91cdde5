"""Session-wide test setup: offline Hugging Face access and the tiny FLUX.1-dev folder."""

import os

# Before anything imports huggingface_hub: tests must never reach the network.
os.environ["HF_HUB_OFFLINE"] = "1"

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from tiny import write_tiny_pipeline  # noqa: E402


@pytest.fixture(scope="session")
def tiny_flux(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random FLUX.1-dev pipeline folder (Hugging Face layout), written once per session."""
    return write_tiny_pipeline(tmp_path_factory.mktemp("tiny-flux"))
