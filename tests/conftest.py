import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("QGMRN_SHARED_DATA", REPO.parent / "shared" / "data"))
REAL_SAMPLE = SHARED_DATA / "clevr-real-sample"


@pytest.fixture(scope="session")
def real_sample() -> Path:
    if not REAL_SAMPLE.exists():
        pytest.skip(f"real CLEVR sample not found at {REAL_SAMPLE} (set QGMRN_SHARED_DATA)")
    return REAL_SAMPLE


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_cuda = torch.cuda.is_available()
    except ImportError:
        has_cuda = False
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none is available here")
    for item in items:
        if "gpu" in item.keywords and not has_cuda:
            item.add_marker(skip)
