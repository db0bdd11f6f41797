"""Training-only supervision from scenes and programs (scene_weight, where_weight): the targets
are right on real CLEVR, the runs train on generated, real and rendered data and resume exactly,
data without scenes is refused before any work, and the exported model is the paper's graph."""
import importlib.util
import json
from collections import Counter

import onnx
import pytest
import torch

from conftest import tiny_train_config
from qgmrn.checkpoint import load_checkpoint
from qgmrn.data.programs import pointed_objects
from qgmrn.data.sources import load_clevr
from qgmrn.data.supervision import load_scene_targets
from qgmrn.train import main as train_main, train
from qgmrn.train.supervision import SupervisionHeads

quiet = dict(log=lambda *a, **k: None)
AUX = dict(scene_weight=0.5, where_weight=1.0)


def test_real_programs_point_at_the_objects_they_query_count_and_compare(real_sample):
    kinds = Counter()
    for split in ("train", "val"):
        scenes = {s["image_filename"]: s for s in json.loads(
            (real_sample / "scenes" / f"CLEVR_{split}_scenes.json").read_text())["scenes"]}
        for rec in json.loads((real_sample / "questions" / f"CLEVR_{split}_questions.json").read_text())["questions"]:
            objs, answer = pointed_objects(rec["program"], scenes[rec["image_filename"]])
            assert answer == rec["answer"]                          # the executor agrees with CLEVR
            last = rec["program"][-1]["function"]
            kinds[last] += 1
            if last == "count":
                assert len(objs) == int(answer)
            elif last == "exist":
                assert bool(objs) == (answer == "yes")
            elif last.startswith("query_"):
                assert len(objs) == 1
                assert scenes[rec["image_filename"]]["objects"][objs[0]][last[6:]] == answer
            elif last.startswith("equal_") and last != "equal_integer":
                assert 1 <= len(objs) <= 2                          # the two objects compared
    assert {"count", "exist", "query_color", "equal_integer"} <= set(kinds)


def test_positions_map_through_the_square_resize(real_sample):
    samples = load_clevr(real_sample, "val")
    targets = load_scene_targets(real_sample, "val", len(samples))
    scene = json.loads((real_sample / "scenes" / "CLEVR_val_scenes.json").read_text())["scenes"][0]
    row = targets.objects[0]
    for k, o in enumerate(scene["objects"]):                       # CLEVR images are 480 x 320
        assert row[k, 0] == pytest.approx(o["pixel_coords"][0] / 480) and row[k, 1] == pytest.approx(
            o["pixel_coords"][1] / 320)
    assert (row[len(scene["objects"]):, 0] == -1).all()
    assert targets.where_ok.all() and not targets.skipped


def test_the_where_loss_rewards_marking_exactly_the_pointed_objects_cells():
    heads = SupervisionHeads(1, scene=False, where=True)
    with torch.no_grad():
        heads.where.weight.fill_(1.0)
        heads.where.bias.zero_()
    targets = torch.full((1, 10, 7), -1.0)
    targets[0, :2, :6] = torch.tensor([[0.30, 0.70, 0, 0, 0, 0], [0.90, 0.10, 1, 1, 1, 1]])
    targets[0, :2, 6] = torch.tensor([1.0, 0.0])                   # the question points at object 0
    right, wrong = torch.full((1, 1, 8, 8), -20.0), torch.full((1, 1, 8, 8), -20.0)
    right[0, 0, 5, 2] = 20.0                                       # row 0.70 * 8, column 0.30 * 8
    wrong[0, 0, 0, 7] = 20.0                                       # the other object's cell
    assert heads.where_loss(right, targets) < 1e-6 < 0.1 < heads.where_loss(wrong, targets)


@pytest.mark.parametrize("source", ["generated", "real"])
def test_scene_and_where_losses_train_and_resume_exactly(source, tiny_data, real_sample, tmp_path):
    root = tiny_data if source == "generated" else real_sample
    cache = dict(cache_dir=str(tmp_path / "cache"))
    straight, split = tmp_path / "straight", tmp_path / "split"
    train(tiny_train_config(root, straight, steps=6, **AUX, **cache), **quiet)
    train(tiny_train_config(root, split, steps=3, **AUX, **cache), **quiet)
    train(tiny_train_config(root, split, steps=6, **AUX, **cache), resume=str(split / "ckpt.pt"), **quiet)
    a, b = load_checkpoint(straight / "ckpt.pt"), load_checkpoint(split / "ckpt.pt")
    for key in ("model", "supervision"):
        assert a[key].keys() == b[key].keys()
        for k in a[key]:
            assert torch.equal(a[key][k], b[key][k]), (key, k)
    assert {"scene.weight", "where.weight"} <= set(a["supervision"])
    logged = [json.loads(line) for line in (straight / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in logged if "loss" in r]
    assert all(r["scene_loss"] > 0 and r["where_loss"] > 0 for r in steps)


@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy not installed (pip install -e '.[render]')")
def test_scene_and_where_losses_train_on_rendered_data(tmp_path):
    from qgmrn.data.generate import main as generate_main
    data = tmp_path / "rendered"
    assert generate_main(["--renderer", "blender", "--size", "64", "43", "--samples", "2", "--questions", "4",
                          "--images", "4", "--val-images", "1", "--out", str(data)]) == 0
    said = []
    train(tiny_train_config(data, tmp_path / "run", steps=2, batch_size=4, **AUX), log=said.append)
    assert any("of 16 questions point at objects" in str(m) for m in said)
    assert "supervision" in load_checkpoint(tmp_path / "run" / "ckpt.pt")


@pytest.mark.parametrize("data", ["jsonl", "humans", "no scenes file"])
def test_data_without_scenes_is_refused_in_one_line_before_any_work(data, tiny_data, real_sample, tmp_path, capsys):
    import shutil
    out = tmp_path / "run"
    if data == "jsonl":
        src = ["--jsonl", str(tmp_path / "a.jsonl"), str(tmp_path / "b.jsonl")]
    elif data == "humans":
        humans = str(real_sample / "humans" / "CLEVR-Humans-val.json")
        src = ["--data-root", str(real_sample), "--humans", humans, humans]
    else:
        root = tmp_path / "copy"
        shutil.copytree(tiny_data, root, ignore=shutil.ignore_patterns("scenes"))
        src = ["--data-root", str(root), "--cache-dir", str(tmp_path / "cache")]
    assert train_main(src + ["--preset", "tiny", "--steps", "2", "--out", str(out), "--set", "where_weight=1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and ("scene" in err[0]) and "Traceback" not in err[0], err
    assert not out.exists()


def test_a_model_trained_with_both_losses_exports_the_papers_graph_and_passes_parity(tiny_data, tiny_bundle, tmp_path):
    from export.to_onnx import main as to_onnx_main
    run = tmp_path / "run"
    train(tiny_train_config(tiny_data, run, **AUX), **quiet)
    assert "supervision" in load_checkpoint(run / "ckpt.pt")
    out = tmp_path / "bundle"
    assert to_onnx_main([str(run / "ckpt.pt"), "--out", str(out), "--data-root", str(tiny_data),
                         "--parity-samples", "16"]) == 0                    # 0: parity passed
    assert json.loads((out / "parity.json").read_text())["passed"] is True

    def signature(path):
        g = onnx.load(str(path)).graph
        return [(v.name, len(v.type.tensor_type.shape.dim)) for v in (*g.input, *g.output)], \
            sorted(i.name for i in g.initializer)
    ours, papers = signature(out / "model.onnx"), signature(tiny_bundle / "model.onnx")
    assert ours == papers                                          # same inputs, outputs and weights


def test_the_cpu_presets_learn_from_scenes_unless_told_otherwise(tiny_data, tmp_path):
    from qgmrn.train.data import resolve_supervision
    on = resolve_supervision(tiny_train_config(tiny_data, tmp_path, preset="small-frn"), has_scenes=True)
    assert (on.scene_weight, on.where_weight) == (0.5, 1.0)
    for cfg, scenes in ((tiny_train_config(tiny_data, tmp_path, preset="small"), False),     # JSON lines
                        (tiny_train_config(tiny_data, tmp_path, preset="brn-c32"), True)):   # a paper preset
        off = resolve_supervision(cfg, scenes)
        assert (off.scene_weight, off.where_weight) == (0.0, 0.0)
    told = resolve_supervision(tiny_train_config(tiny_data, tmp_path, preset="small", where_weight=0.0), True)
    assert (told.scene_weight, told.where_weight) == (0.5, 0.0)
    run = tmp_path / "run"                                         # the tiny test preset keeps the paper's loss
    train(tiny_train_config(tiny_data, run, steps=1), **quiet)
    state = load_checkpoint(run / "ckpt.pt")
    assert "supervision" not in state and state["train_config"]["scene_weight"] == 0.0


def test_a_run_from_before_these_losses_resumes_with_the_papers_loss(tiny_data, tmp_path):
    from qgmrn.train.resume import restore_config
    saved = {"data_root": str(tiny_data), "preset": "small", "steps": 10, "out": str(tmp_path)}   # no weights
    cfg = restore_config(saved, {}, tmp_path / "ckpt.pt")
    assert (cfg.scene_weight, cfg.where_weight) == (0.0, 0.0)


def test_the_scene_loss_on_the_stem_teaches_the_stem_and_no_routed_block(tiny_data, tmp_path):
    """scene_gates="stem": the scene head reads the map before any routed block, so the perception
    loss cannot ask the routing to stay open (and there is no second visual pass)."""
    from qgmrn.checkpoint import model_from_checkpoint
    from qgmrn.train.supervision import TrainingForward
    run = tmp_path / "run"
    train(tiny_train_config(tiny_data, run, steps=3, scene_weight=0.5, where_weight=0.0, scene_gates="stem"), **quiet)
    state = load_checkpoint(run / "ckpt.pt")
    model = model_from_checkpoint(state)
    assert state["train_config"]["scene_gates"] == "stem"
    assert state["supervision"]["scene.weight"].shape[1] == model.cfg.stem_width != model.visual.out_channels
    steps = [r for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss" in r]
    assert steps and all(r["scene_loss"] > 0 for r in steps)

    heads = SupervisionHeads(model.visual.out_channels, scene=True, where=False, scene_channels=model.cfg.stem_width)
    forward = TrainingForward(model, heads, "stem")
    image, tokens, lengths = torch.rand(2, 3, model.cfg.image_size, model.cfg.image_size), \
        torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3])
    targets = torch.full((2, 10, 7), -1.0)
    targets[:, 0, :6] = torch.tensor([0.5, 0.5, 1, 0, 1, 0])
    _, losses = forward(image, tokens, lengths, targets)
    losses.scene.backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.visual.stem.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.visual.blocks.parameters())
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.router.parameters())
