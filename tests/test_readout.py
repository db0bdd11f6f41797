"""The plain head's read-outs beyond the paper (issue 39 part 2): the question meets the map before
pooling ("film"), a sum over positions beside the max ("max+sum") with its training-only count
loss; each trains, keeps its setting in the checkpoint, exports with parity and answers in the
runtime unchanged."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_train_config
from qgmrn.checkpoint import load_checkpoint
from qgmrn.config import get_config
from qgmrn.model import create_model
from qgmrn.settings import SettingsError
from qgmrn.train import train
from qgmrn.train.supervision import SupervisionHeads


def test_film_readout_lets_the_question_change_the_pooled_features_and_sum_counts_objects():
    torch.manual_seed(0)
    model = create_model("tiny", readout="film", pool="max+sum").eval()
    fmap = torch.randn(2, model.visual.out_channels, 4, 4)
    q1, q2 = torch.randn(1, model.cfg.hidden_dim), torch.randn(1, model.cfg.hidden_dim)
    head = model.head
    with torch.no_grad():
        a, b = head.features(fmap[:1], q1), head.features(fmap[:1], q2)
    assert not torch.allclose(a, b)                      # the question reaches every position
    plain = create_model("tiny").eval().head
    with torch.no_grad():
        assert torch.allclose(plain.features(fmap[:1], q1), plain.features(fmap[:1], q2))
    # one bright cell vs three: the max is the same, the sum is not
    one = torch.zeros(1, 3, 4, 4)
    one[0, :, 0, 0] = 1
    three = one.clone()
    three[0, :, 1, 1] = three[0, :, 2, 2] = 1
    assert torch.equal(one.amax((2, 3)), three.amax((2, 3)))
    assert torch.allclose(head.pooled_sum(three), 3 * head.pooled_sum(one))


def test_the_count_loss_reads_only_count_answers():
    heads = SupervisionHeads(8, False, False, ["yes", "no", "0", "2", "red"], head_dim=4)
    with torch.no_grad():
        heads.count.weight.fill_(1.0)
        heads.count.bias.zero_()
    pooled = torch.tensor([[0.5, 0.5, 0.5, 0.5], [1.0, 0.0, 0.0, 0.0], [9.0, 9.0, 9.0, 9.0]])
    # row 0 predicts 2 for the answer "2", row 1 predicts 1 for "0"; row 2 answers "red": ignored
    loss = heads.count_loss(pooled, torch.tensor([3, 2, 4]))
    assert loss.item() == pytest.approx((0.0 + 0.5) / 2)
    assert "answer_counts" not in heads.state_dict()     # rebuilt from the answers, never saved


def test_readout_settings_are_checked():
    with pytest.raises(ValueError, match="readout must be one of"):
        get_config("tiny", readout="conv")
    with pytest.raises(ValueError, match="attention head has its own"):
        get_config("tiny+attn", pool="max+sum")


def test_count_weight_without_the_sum_is_one_clear_error(tiny_data, tmp_path):
    with pytest.raises(SettingsError, match="pool=max\\+sum"):
        train(tiny_train_config(tiny_data, tmp_path / "r", count_weight=0.5), log=lambda *a: None)


def test_film_sum_count_model_trains_exports_with_parity_and_answers_in_the_runtime(tiny_data, tmp_path):
    from qgmrn.train import main as train_main
    out = tmp_path / "run"
    assert train_main(["--data-root", str(tiny_data), "--preset", "tiny", "--steps", "6", "--batch-size", "8",
                       "--out", str(out), "--set", "warmup_steps=2", "--set", "readout=film",
                       "--set", "pool=max+sum", "--set", "count_weight=0.5", "--set", "log_every=1"]) == 0
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert any("count_loss" in r and np.isfinite(r["count_loss"]) for r in rows)
    ckpt = load_checkpoint(out / "ckpt.pt")
    assert ckpt["model_config"]["readout"] == "film" and ckpt["model_config"]["pool"] == "max+sum"
    assert "count.weight" in ckpt["supervision"]
    from export.to_onnx import main as to_onnx_main
    bundle = tmp_path / "bundle"
    assert to_onnx_main([str(out / "ckpt.pt"), "--out", str(bundle), "--data-root", str(tiny_data),
                         "--parity-samples", "16"]) == 0
    parity = json.loads((bundle / "parity.json").read_text())
    assert parity["passed"] is True
    import runtime
    model = runtime.load(bundle, backend="onnxruntime")
    image = next((tiny_data / "images" / "val").iterdir())
    assert model.answer(image, "How many cubes are there?") in ckpt["answers"]
