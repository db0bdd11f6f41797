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


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory) -> Path:
    """A small generated CLEVR-style dataset (real layout, real renders of the generator)."""
    from qgmrn.data.generate import generate
    root = tmp_path_factory.mktemp("clevr-tiny")
    generate(root, images=24, val_images=8, questions=6, seed=1, workers=1, log=lambda *a: None)
    return root


def tiny_train_config(data_root, out, **kw):
    from qgmrn.train import TrainConfig
    fields = dict(data_root=str(data_root), preset="tiny", steps=4, batch_size=8, warmup_steps=2,
                  log_every=1, save_every=1000, out=str(out), seed=0)
    fields.update(kw)
    return TrainConfig(**fields)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> Path:
    from qgmrn.train import train
    out = tmp_path_factory.mktemp("run")
    train(tiny_train_config(tiny_data, out), log=lambda *a: None)
    return out / "ckpt.pt"
