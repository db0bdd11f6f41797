"""A tampered checkpoint is one CheckpointError line wherever it is read (resume, export,
evaluate), before anything is allocated from what it claims (trust round 5, M5)."""
import pytest
import torch

from qgmrn.evaluate import main as evaluate_main
from qgmrn.train import main as train_main
from export.to_onnx import main as export_main


def _tamper(src, dst, change):
    state = torch.load(src, weights_only=True)
    change(state)
    dst.parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, dst)


def _config(**kw):
    return lambda s: s["model_config"].update(**kw)


SIZES = [("huge-vocab", _config(vocab_size=10**10), "does not match its weights"),
         ("huge-widths", _config(stage_widths=[10**5, 10**5]), "does not match its weights"),
         ("huge-embedding", _config(embed_dim=10**9), "does not match its weights"),
         ("huge-image", _config(image_size=10**6), "px images"),
         ("weights-not-tensors", lambda s: s.update(model={"a": 1}), "not a set of tensors")]
RESUME = [("train-config-list", lambda s: s.update(train_config=[1, 2]), "train_config"),
          ("lr-text", lambda s: s["optimizer"]["param_groups"][0].update(lr="abc"), "learning rate"),
          ("lr-nan", lambda s: s["optimizer"]["param_groups"][0].update(lr=float("nan")), "learning rate"),
          ("base-lrs-text", lambda s: s["scheduler"].update(base_lrs=["x"]), "base learning rates"),
          ("seconds-text", lambda s: s.update(train_seconds="x"), "training time")]
VOCAB = [("vocab-without-null", lambda s: s.update(vocab=["a", "b"] + s["vocab"][2:]), "starting with <NULL>")]


def _one_line(capsys, message):
    err = capsys.readouterr().err.strip()
    assert message in err and "Traceback" not in err and len(err.splitlines()) == 1, err


@pytest.mark.parametrize("name, change, message", SIZES + RESUME)
def test_a_tampered_checkpoint_is_refused_at_resume_in_one_line(tiny_checkpoint, tmp_path, capsys, name, change,
                                                                 message):
    out = tmp_path / name
    _tamper(tiny_checkpoint, out / "ckpt.pt", change)
    before = (out / "ckpt.pt").read_bytes()
    assert train_main(["--resume", "--out", str(out), "--steps", "8"]) == 2
    _one_line(capsys, message)
    assert (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("name, change, message", SIZES + VOCAB)
def test_a_tampered_checkpoint_is_refused_by_export_and_evaluate_in_one_line(tiny_checkpoint, tiny_data, tmp_path,
                                                                             capsys, name, change, message):
    pytest.importorskip("onnx")
    ckpt = tmp_path / name / "ckpt.pt"
    _tamper(tiny_checkpoint, ckpt, change)
    assert export_main([str(ckpt), "--out", str(tmp_path / "bundle")]) == 2
    _one_line(capsys, message)
    assert not (tmp_path / "bundle").exists()
    assert evaluate_main([str(ckpt), "--data-root", str(tiny_data)]) == 2
    _one_line(capsys, message)
