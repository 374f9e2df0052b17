from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MPLBACKEND", "Agg")
torch.set_num_threads(1)  # small models: one thread is faster and immune to oversubscription

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

#: Why a ``@pytest.mark.gpu`` test is skipped on a machine without CUDA.
NO_CUDA_REASON = "needs a CUDA device: torch.cuda.is_available() is False on this machine"


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests run wherever CUDA is present and are skipped (with the reason) elsewhere.

    pyproject's ``addopts`` deselects only ``slow`` tests, so on a CUDA machine the plain ``pytest`` runs the
    ``gpu`` tests too; ``-m 'not gpu'`` still leaves them out by hand. CUDA is queried here, at collection
    time, not when this file is imported.
    """
    gpu_items = [item for item in items if item.get_closest_marker("gpu") is not None]
    if gpu_items and not torch.cuda.is_available():
        skip = pytest.mark.skip(reason=NO_CUDA_REASON)
        for item in gpu_items:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_torch_thread():
    """One intra-op torch thread for a module's tests, the previous count restored afterwards (on a shared 2-core
    machine two threads per process oversubscribe and run ~5x slower). Use: ``pytestmark =
    pytest.mark.usefixtures("one_torch_thread")``."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def bb():
    """The random ``bpfl-tiny`` backbone at 112 px (an 8 x 8 patch grid), layers 1-4, seeded 0: one per module."""
    from bpfl.backbone import load_backbone
    torch.manual_seed(0)
    return load_backbone("bpfl-tiny", None, image_size=112, layers=(1, 2, 3, 4), device="cpu")


@pytest.fixture(scope="session")
def tiny_backbone():
    from bpfl.backbone import load_backbone
    torch.manual_seed(0)
    return load_backbone("bpfl-tiny", None, image_size=224, layers=(1, 2, 3, 4), device="cpu")


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real sample data not found at {SHARED_DATA}")
    return SHARED_DATA
