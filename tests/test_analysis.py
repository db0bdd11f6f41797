"""The paper's analyses: routing t-SNE with a separation number, saliency, and the ablation grid."""
import json

import pytest
import torch

from qgmrn.ablate import main as ablate_main
from qgmrn.analyze import main as analyze_main, routing_analysis, pick_per_subtype
from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
from qgmrn.data.sources import load_clevr
from qgmrn.model import QGMRN
from qgmrn.preprocess import Vocab, encode_batch

pytest.importorskip("sklearn", reason="needs scikit-learn: pip install -e '.[analysis]'")
pytest.importorskip("matplotlib", reason="needs matplotlib: pip install -e '.[analysis]'")


def test_analyze_writes_figures_and_numbers(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "a"
    assert analyze_main([str(tiny_checkpoint), "--data-root", str(tiny_data), "--out", str(out),
                         "--per-subtype", "5"]) == 0
    for name in ("routing_stage1.png", "routing_stage2.png", "saliency.png", "execution_ratio.png"):
        assert (out / name).stat().st_size > 1000, name
    report = json.loads((out / "routing.json").read_text())
    assert set(report["trained"]) == {"stage1", "stage2"} == set(report["random_init"])
    for stage in report["trained"].values():
        assert -1.0 <= stage["silhouette"] <= 1.0 and 0.0 <= stage["knn_accuracy"] <= 1.0
    assert report["saliency"]["questions"]


def test_routing_trained_to_follow_question_type_separates_better_than_random(tiny_checkpoint, tiny_data):
    """A toy task: train the question path so that the gates predict the question's subtype; the
    separation numbers must then beat a random-init model's."""
    state = load_checkpoint(tiny_checkpoint)
    vocab = Vocab(list(state["vocab"]))
    samples = pick_per_subtype(load_clevr(tiny_data, "train") + load_clevr(tiny_data, "val"), 20)
    subtypes = sorted({s.subtype for s in samples})
    torch.manual_seed(0)
    model = QGMRN(model_from_checkpoint(state).cfg)
    random_init = QGMRN(model.cfg)
    random_init.load_state_dict(model.state_dict())
    readout = torch.nn.Linear(sum(model.cfg.layer_sizes), len(subtypes))
    opt = torch.optim.Adam(list(model.text.parameters()) + list(model.router.parameters()) +
                           list(readout.parameters()), 1e-2)
    tokens, lengths, _ = encode_batch(vocab, [s.question for s in samples])
    y = torch.tensor([subtypes.index(s.subtype) for s in samples])
    for _ in range(150):
        logits = model.router.fc(model.encode_question(torch.from_numpy(tokens), torch.from_numpy(lengths)))
        loss = torch.nn.functional.cross_entropy(readout(torch.sigmoid(logits)), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    trained = routing_analysis(model, vocab, samples, None, "toy", plot=False)
    baseline = routing_analysis(random_init, vocab, samples, None, "random", plot=False)
    best = max(v["knn_accuracy"] for v in trained.values())
    assert best > max(v["knn_accuracy"] for v in baseline.values()) + 0.2
    assert max(v["silhouette"] for v in trained.values()) > max(v["silhouette"] for v in baseline.values())


def test_analyze_without_its_extras_says_what_to_install(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import builtins
    real = builtins.__import__
    monkeypatch.setattr(builtins, "__import__",
                        lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "sklearn"
                        else real(name, *a, **k))
    assert analyze_main([str(tiny_checkpoint), "--out", str(tmp_path / "x")]) == 2
    assert "pip install -e '.[analysis]'" in capsys.readouterr().err


def test_ablation_grid_runs_two_rows_and_resumes(tiny_data, tmp_path, capsys):
    args = ["--out", str(tmp_path / "g"), "--rows", "c8", "c8-bn", "--steps", "2", "--data-root", str(tiny_data),
            "--set", "batch_size=8", "--set", "max_val=16"]
    assert ablate_main(args) == 0
    table = (tmp_path / "g" / "table.md").read_text()
    assert "| c8 |" in table and "| c8-bn |" in table and "86.8 / 90.0" in table
    # an interrupted row (its eval.json gone, its checkpoint kept) continues; a finished one is kept
    row_file = tmp_path / "g" / "c8" / "row.json"
    before = row_file.read_text()
    (tmp_path / "g" / "c8-bn" / "row.json").unlink()
    assert ablate_main(args) == 0
    assert row_file.read_text() == before
    assert json.loads((tmp_path / "g" / "table.json").read_text())[1]["row"] == "c8-bn"
