"""Routing use: how much of the network a question switches, reported wherever accuracy is (issue 39)."""
import json

import numpy as np
import pytest
import torch

from conftest import tiny_train_config
from qgmrn.evaluate import main as evaluate_main
from qgmrn.routing import routing_use, target_rate_loss
from qgmrn.train import train


def test_routing_use_counts_what_the_gates_did():
    # two layers of 2 and 4 modules (FRN-like padding to 4); four questions, two images
    g = np.zeros((4, 2, 4), dtype=bool)
    g[:, 0, 0] = True                       # on for every question
    g[0, 1, :2] = g[1, 1, 2:] = True        # image a: the two questions differ in 4 of 6 modules
    g[2, 1, :] = g[3, 1, :] = True          # image b: identical questions
    g[:, 0, 3] = True                       # a padded slot: never counted
    u = routing_use(g, (2, 4), ["a", "a", "b", "b"], ["count", "exist", "count", "exist"])
    assert u["modules"] == 6 and u["questions"] == 4
    assert u["always_on"] == 1 and u["always_off"] == 1             # layer 1: module 0 on, module 1 off
    assert u["filters_executed"] == pytest.approx((3 + 3 + 5 + 5) / 24)
    assert u["per_layer_executed"] == pytest.approx([0.5, 0.75])
    assert u["differ_same_image"] == pytest.approx((4 / 6 + 0) / 2) and u["image_pairs"] == 2
    assert u["per_type_executed"]["count"] == pytest.approx((3 + 5) / 12)


def test_target_rate_loss_is_zero_at_the_target_and_pulls_open_gates_shut():
    open_gates = torch.ones(8, 2, 4, requires_grad=True)
    loss = target_rate_loss(open_gates, (4, 4), 0.6)
    assert loss.item() == pytest.approx(0.16)
    loss.backward()
    assert (open_gates.grad > 0).all()                                # descending closes gates
    half = torch.zeros(8, 2, 4)
    half[:, :, :2] = 1
    assert target_rate_loss(half, (4, 4), 0.5).item() == pytest.approx(0.0)
    # the load-balancing term cannot tell: every module equally loaded, open or half-open
    from qgmrn.routing import load_balancing_loss
    assert load_balancing_loss(torch.ones(8, 2, 4), (4, 4)).item() == pytest.approx(0.0)


def test_a_tiny_run_reports_routing_use_in_its_log_metrics_curves_and_evaluation(tiny_data, tmp_path, capsys):
    said = []
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=4, eval_every=2, exec_target=0.5), log=said.append)
    lines = [str(m) for m in said]
    assert sum("gates on for every question" in m and "differ between two questions about one image" in m
               for m in lines) >= 2                                   # step 2 and the final evaluation
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"split": "val"' in x]
    use = val[-1]["routing"]
    assert use["modules"] == 8 and 0.0 <= use["filters_executed"] <= 1.0 and len(use["per_layer_executed"]) == 2
    assert use["image_pairs"] > 0 and set(use["per_type_executed"]) <= {
        "count", "exist", "compare_numbers", "query_attribute", "compare_attribute"}
    pytest.importorskip("matplotlib")
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    capsys.readouterr()
    assert evaluate_main([str(out / "ckpt.pt"), "--json", str(tmp_path / "e.json")]) == 0
    assert "gates on for every question" in capsys.readouterr().out
    result = json.loads((tmp_path / "e.json").read_text())
    assert result["routing"]["use"]["modules"] == 8


def test_exec_target_is_checked_before_any_work(tmp_path):
    from qgmrn.settings import SettingsError
    with pytest.raises(SettingsError, match="exec_target"):
        train(tiny_train_config(None, tmp_path / "x", exec_target=1.5), log=lambda *a: None)
    assert not (tmp_path / "x").exists()


def test_the_cpu_presets_route_by_default_and_old_runs_keep_their_loss():
    """Where the CPU presets learn from scenes, the scene loss reads the open pass and a 0.6 target
    rate keeps the routing the question's; the paper's presets and explicit settings are untouched;
    a run saved before these settings resumes with the loss it trained with."""
    from qgmrn.train import TrainConfig
    from qgmrn.train.data import resolve_supervision
    from qgmrn.train.resume import restore_config
    auto = resolve_supervision(TrainConfig(preset="small-frn"), has_scenes=True)
    assert (auto.scene_weight, auto.where_weight, auto.exec_target, auto.scene_gates) == (0.5, 1.0, 0.6, "open")
    assert resolve_supervision(TrainConfig(preset="brn-c32"), has_scenes=True).exec_target == 0.0
    assert resolve_supervision(TrainConfig(preset="small"), has_scenes=False).exec_target == 0.0
    assert resolve_supervision(TrainConfig(preset="small", exec_target=0.0), has_scenes=True).exec_target == 0.0
    old = {"preset": "small-frn", "steps": 10, "scene_weight": 0.5, "where_weight": 1.0}   # no such fields then
    cfg = restore_config(old, {}, "runs/old/ckpt.pt")
    assert cfg.exec_target == 0.0 and cfg.scene_gates == "question"
