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
    fields = dict(data_root=None if data_root is None else str(data_root), preset="tiny", steps=4, batch_size=8,
                  warmup_steps=2,
                  log_every=1, save_every=1000, out=str(out), seed=0)
    fields.update(kw)
    return TrainConfig(**fields)


@pytest.fixture(scope="session")
def tiny_checkpoint(tiny_data, tmp_path_factory) -> Path:
    from qgmrn.train import train
    out = tmp_path_factory.mktemp("run")
    train(tiny_train_config(tiny_data, out), log=lambda *a: None)
    return out / "ckpt.pt"


def save_random_checkpoint(path, preset, real_sample=None, spread_routing=True, seed=0):
    """A random-init checkpoint of `preset` with a vocabulary that covers the real CLEVR sample.
    spread_routing: route logits of either sign, so gates really differ between questions."""
    import torch
    from qgmrn.checkpoint import save_checkpoint
    from qgmrn.model import create_model
    from qgmrn.preprocess import Vocab, tokenize
    questions = ["What color is the big cube?", "How many spheres are there?"]
    answers = ["yes", "no", "0", "1", "2", "3", "red", "blue", "cube", "sphere"]
    if real_sample is not None:
        from qgmrn.data.sources import load_clevr
        samples = load_clevr(real_sample, "train") + load_clevr(real_sample, "val")
        questions = [s.question for s in samples]
        answers = sorted({s.answer for s in samples})
    vocab = Vocab.build(questions)
    torch.manual_seed(seed)
    model = create_model(preset, vocab_size=len(vocab), num_answers=len(answers)).eval()
    if spread_routing:
        with torch.no_grad():
            model.router.fc.weight.normal_(0, 0.5)
            model.router.fc.bias.zero_()
    save_checkpoint(path, model=model, vocab=vocab.tokens, answers=answers,
                    max_question_len=max(len(tokenize(q)) for q in questions) + 5)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tiny_data, tmp_path_factory) -> Path:
    """A published export of the tiny checkpoint (model.onnx, parity.json), shared read-only:
    tests that alter it work on a copy."""
    from export.to_onnx import main as to_onnx_main
    out = tmp_path_factory.mktemp("tiny-export") / "bundle"
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(out), "--data-root", str(tiny_data),
                         "--parity-samples", "16"]) == 0
    return out


def with_metadata(src, dst, change):
    """A copy of the ONNX file `src` at `dst` whose QGMRN metadata went through change(meta)."""
    import json
    import onnx
    m = onnx.load(str(src))
    prop = next(p for p in m.metadata_props if p.key == "qgmrn")
    meta = json.loads(prop.value)
    change(meta)
    prop.value = json.dumps(meta)
    onnx.save(m, str(dst))
    return dst
