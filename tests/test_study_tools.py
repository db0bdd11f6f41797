"""The learning study's tools. study/probe_objects.py: the linear probe finds an attribute that the
features hold and not one they do not, and runs end to end on a generated dataset and a trained
checkpoint. study/grow_checkpoint.py: a deepened model answers exactly as the trained one, and
every grown checkpoint trains on with --init-from."""
import importlib.util
import json

import numpy as np
import pytest
import torch

from conftest import REPO


def _module(name="probe_objects", folder="study"):
    spec = importlib.util.spec_from_file_location(name, REPO / folder / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_the_probe_reads_what_the_features_hold_and_nothing_else():
    probe = _module().probe
    rng = np.random.default_rng(0)
    colours = np.array(["red", "green", "blue", "cyan"])
    ytr, yva = rng.integers(0, 4, 600), rng.integers(0, 4, 300)
    centres = rng.normal(size=(4, 16)) * 2.0
    xtr = centres[ytr] + rng.normal(size=(600, 16))
    xva = centres[yva] + rng.normal(size=(300, 16))
    assert probe(xtr, list(colours[ytr]), xva, list(colours[yva])) > 0.95
    noise_tr, noise_va = rng.normal(size=(600, 16)), rng.normal(size=(300, 16))
    assert probe(noise_tr, list(colours[ytr]), noise_va, list(colours[yva])) < 0.4      # chance 0.25


def test_it_probes_every_block_of_a_checkpoint_and_its_random_twin(tiny_data, tiny_checkpoint, tmp_path):
    out = tmp_path / "probe.json"
    assert _module().main([str(tiny_checkpoint), "--data-root", str(tiny_data), "--train-scenes", "24",
                           "--val-scenes", "8", "--out", str(out)]) == 0
    result = json.loads(out.read_text())
    scenes = json.loads((tiny_data / "scenes" / "CLEVR_val_scenes.json").read_text())["scenes"]
    assert result["objects"]["val"] == sum(len(s["objects"]) for s in scenes)
    assert set(result["probes"]) == {"trained", "random init"}
    for rows in result["probes"].values():
        assert len(rows) == 2                                     # the tiny preset's two blocks
        for row in rows.values():
            assert set(row) == {"shape", "color", "size", "material"}
            assert all(0.0 <= v <= 1.0 for v in row.values())
    assert all(0.0 < v <= 1.0 for v in result["majority"].values())


def test_deepening_keeps_every_answer_and_adds_a_routing_layer_per_block(tiny_checkpoint, tmp_path):
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    out = tmp_path / "deep.pt"
    assert _module("grow_checkpoint").main([str(tiny_checkpoint), str(out), "--deepen"]) == 0
    old = model_from_checkpoint(load_checkpoint(tiny_checkpoint)).eval()
    new = model_from_checkpoint(load_checkpoint(out)).eval()
    assert new.cfg.num_layers == 2 * old.cfg.num_layers
    torch.manual_seed(0)
    image = torch.randn(6, 3, old.cfg.image_size, old.cfg.image_size)
    tokens = torch.randint(1, old.cfg.vocab_size, (6, 9))
    lengths = torch.tensor([9, 8, 5, 9, 3, 7])
    with torch.no_grad():
        a, b = old(image, tokens, lengths), new(image, tokens, lengths)
    assert torch.equal(a.logits, b.logits)
    assert torch.equal(a.gates, b.gates[:, 0::2])                 # the trained layers route as before


@pytest.mark.parametrize("how", [["--deepen"], ["--attention", "--attn-dim", "16"], ["--set", "image_size=48"]])
def test_a_grown_checkpoint_trains_on_with_init_from(how, tiny_data, tiny_checkpoint, tmp_path):
    from conftest import tiny_train_config
    from qgmrn.checkpoint import load_checkpoint
    from qgmrn.train import train
    grown = tmp_path / "grown.pt"
    assert _module("grow_checkpoint").main([str(tiny_checkpoint), str(grown), *how]) == 0
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=2), init_from=str(grown), log=lambda *a: None)
    state = load_checkpoint(tmp_path / "run" / "ckpt.pt")
    assert state["step"] == 2 and state["model_config"] == load_checkpoint(grown)["model_config"]


def test_a_foreign_file_or_a_change_that_moves_weights_is_one_error_line(tiny_checkpoint, tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    # the tiny preset's second block (16 -> 16 channels) loses its strided projection at stride 1
    for args in ([str(bad), str(tmp_path / "out.pt"), "--deepen"],
                 [str(tiny_checkpoint), str(tmp_path / "out.pt"), "--set", "stage_strides=1,1"]):
        assert _module("grow_checkpoint").main(args) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error:") and not (tmp_path / "out.pt").exists()


def test_film_peer_is_sized_like_qgmrn_small_and_trains_in_the_trainers_format(tiny_data, tmp_path):
    film = _module("film")
    from qgmrn.model import count_macs, create_model
    peer = count_macs(create_model("small", vocab_size=80, num_answers=28))
    assert abs(film.film_macs(film.FiLM(80, 28)) - peer) / peer < 0.1          # the same budget per answer
    assert film.main(["--data-root", str(tiny_data), "--out", str(tmp_path / "f"), "--steps", "4",
                      "--batch-size", "8", "--eval-every", "2", "--image-size", "32"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "f" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4] and all(0 <= r["overall"] <= 1 and r["per_type"] for r in rows)


@pytest.fixture(scope="module")
def one_object_data(tmp_path_factory):
    from qgmrn.data.generate import generate
    root = tmp_path_factory.mktemp("one-object")
    generate(root, images=12, val_images=6, questions=2, seed=3, workers=1, log=lambda *a: None, objects=(1, 1))
    return root


def test_matching_questions_are_true_to_the_scene_and_balanced():
    matching = _module("matching")
    import random
    obj = {"color": "red", "shape": "cylinder", "size": "large", "material": "metal"}
    rng, yes = random.Random(0), {}
    for _ in range(400):
        for q in matching.scene_questions(obj, rng):
            words = q["question"].rstrip("?").split()
            if q["type"] == "match":                     # "yes" exactly when every named value is the object's
                named = [w for w in words if any(w in v for v in matching.VALUES.values())]
                assert named and (q["answer"] == "yes") == all(w in obj.values() for w in named), q
                yes.setdefault(q["subtype"], []).append(q["answer"] == "yes")
            else:
                assert q["answer"] == obj[q["subtype"].removeprefix("query_")]
    assert set(yes) == {"match_color", "match_shape", "match_size", "match_material", "match_pair"}
    assert all(0.4 < sum(v) / len(v) < 0.6 for v in yes.values())          # yes and no equally often


def test_matching_set_trains_and_reports_samples_to_95(one_object_data, tmp_path):
    matching = _module("matching")
    counts = matching.make(one_object_data)
    assert counts == {"train": 12 * 9, "val": 6 * 9}
    rows = [json.loads(x) for x in (one_object_data / "matching" / "train.jsonl").read_text().splitlines()]
    assert all((one_object_data / "matching" / r["image"]).resolve().exists() for r in rows)
    from qgmrn.train import train
    from conftest import tiny_train_config
    out = tmp_path / "run"
    train(tiny_train_config(None, out, jsonl=[str(one_object_data / "matching" / f"{s}.jsonl") for s in ("train", "val")],
                            eval_every=2, eval_every_epoch=False))
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val and {"match", "query_attribute"} <= set(val[-1]["per_type"])      # the file's own types, reported
    assert "match_pair" in val[-1]["per_subtype"]
    table = matching.report([out], tmp_path / "docs")
    assert "| run |" in table and (tmp_path / "docs" / "matching.json").exists()
    again = matching.report([out], None, earlier=tmp_path / "docs" / "matching.json")   # an earlier report's runs join
    assert again.count("| run* |") == 2 and again.count("| run |") == table.count("| run |")    # both tables
    film = _module("film")
    assert film.main(["--jsonl", *(str(one_object_data / "matching" / f"{s}.jsonl") for s in ("train", "val")),
                      "--out", str(tmp_path / "f"), "--steps", "2", "--batch-size", "8", "--eval-every", "2",
                      "--image-size", "32"]) == 0


def test_matching_in_clevr_layout_trains_with_scene_and_where_losses(one_object_data, tmp_path):
    """The same questions with programs: every program runs on its scene to the question's answer,
    so every question has a where target (the object when it matches, none when it does not), and
    the trainer reports the set's own match/query types."""
    matching = _module("matching")
    matching.make(one_object_data)
    root = one_object_data / "matching" / "clevr"
    from qgmrn.data.sources import load_clevr
    from qgmrn.data.supervision import load_scene_targets
    samples = load_clevr(root, "train")
    assert len(samples) == 12 * 9 and {s.qtype for s in samples} == {"match", "query_attribute"}
    targets = load_scene_targets(root, "train", len(samples))
    assert targets.where_ok.all() and not targets.skipped
    yes = np.array([s.answer == "yes" for s in samples])
    match = np.array([s.qtype == "match" for s in samples])
    assert (targets.pointed[match].any(axis=1) == yes[match]).all()      # "no": the program selects nothing
    assert targets.pointed[~match].sum(axis=1).tolist() == [1] * int((~match).sum())   # a query: the one object
    from qgmrn.train import train
    from conftest import tiny_train_config
    out = tmp_path / "run"
    train(tiny_train_config(str(root), out, eval_every=2, eval_every_epoch=False, scene_weight=0.5, where_weight=1.0))
    val = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"val"' in x]
    assert val and {"match", "query_attribute"} <= set(val[-1]["per_type"]) and "match_pair" in val[-1]["per_subtype"]


def test_a_scene_with_more_objects_is_refused(tiny_data):
    with pytest.raises(SystemExit, match="--objects 1 1"):
        _module("matching").make(tiny_data)


def test_builtin_curves_put_two_runs_side_by_side_per_type(tmp_path, capsys):
    """A run's rendered-val records (metrics.jsonl) and its real-sample evaluations meet per step;
    an unreadable curve is one error line."""
    mod = _module("builtin_curves")
    types = {"count": 0.4, "exist": 0.7, "compare_numbers": 0.6, "query_attribute": 0.5, "compare_attribute": 0.55}
    records = [{"step": 10, "loss": 1.0},
               {"step": 20, "split": "val", "samples": 1280, "train_seconds": 120.0, "overall": 0.5, "per_type": types},
               {"step": 40, "split": "val", "samples": 2560, "train_seconds": 240.0, "overall": 0.625,
                "per_type": {**types, "count": 0.45}}]
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    real = tmp_path / "real.json"
    real.write_text(json.dumps({"40": {"n": 340, "overall": 0.52, "per_type": {**types, "exist": 0.66}},
                                "30": {"n": 340, "overall": 0.5, "per_type": types}}))
    out = tmp_path / "out"
    assert mod.main(["--run", "a", str(metrics), str(real), "--out", str(out)]) == 0
    rows = [line for line in (out / "curves.md").read_text().splitlines() if line.startswith("| ") and "k |" in line]
    assert [r.split(" | ")[0] for r in rows] == ["| 20", "| 30", "| 40"]          # val and real steps, in order
    last = rows[-1].split(" | ")
    assert last[1:5] == ["3k", "4", "62.5", "45.0"]        # samples, minutes, val, val count
    assert "52.0" in last and "66.0" in last                                       # the real sample at the same step
    assert mod.main(["--run", "b", str(tmp_path / "missing.jsonl"), str(real), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip().startswith("error: run b: cannot read its curves")


def test_a_recipe_is_checked_against_the_checkpoint_it_claims(tmp_path):
    """make_builtin --recipe: fields the recipe leaves to the trainer (epochs, lr) pass whatever the
    trainer resolved them to; a field the run changed is refused, naming it."""
    from qgmrn.train import TrainConfig
    import dataclasses
    check = _module("make_builtin").check_recipe
    trained = {**dataclasses.asdict(TrainConfig()), "preset": "small-frn", "steps": 44000, "epochs": 10,
               "lr": 1e-3, "scene_weight": 0.5, "where_weight": 1.0}
    recipe = tmp_path / "r.json"
    recipe.write_text(json.dumps({"preset": "small-frn", "steps": 44000, "scene_weight": 0.5, "where_weight": 1.0}))
    assert check(recipe, {"train_config": trained}) == "r.json"
    recipe.write_text(json.dumps({"preset": "small-frn", "steps": 44000, "scene_weight": 0.0, "where_weight": 1.0}))
    with pytest.raises(SystemExit, match="scene_weight=0.0 but the checkpoint was trained with 0.5"):
        check(recipe, {"train_config": trained})


@pytest.mark.parametrize("losses", ["paper", "both"])
def test_trainer_gap_times_the_same_step_on_the_runs_own_batches(losses, tiny_data, tiny_checkpoint, tmp_path,
                                                                 capsys):
    """bench/trainer_gap.py rebuilds a run's batches from its checkpoint and times every row."""
    from conftest import tiny_train_config
    from qgmrn.train import train
    ckpt = tiny_checkpoint
    if losses == "both":
        train(tiny_train_config(tiny_data, tmp_path / "run", scene_weight=0.5, where_weight=1.0),
              log=lambda *a: None)
        ckpt = tmp_path / "run" / "ckpt.pt"
    mod = _module("trainer_gap", folder="bench")
    assert mod.main([str(ckpt), "--batches", "2", "--warmup", "1"]) == 0
    out = capsys.readouterr().out
    rows = [line for line in out.splitlines() if line.rstrip().endswith("x")]
    assert len(rows) == 5 and rows[0].rstrip().endswith("1.00x")
    assert all(float(r.split()[-2]) > 0 for r in rows)
    assert f"where {1.0 if losses == 'both' else 0.0}" in out


def test_every_learning_study_arm_is_a_valid_training_command():
    """An arm with a mistyped --set would fail hours into a study, after the arms before it."""
    from qgmrn.config import get_config
    from qgmrn.model import QGMRN
    from qgmrn.train import parse_args, settle_settings

    study = _module("learning_study")
    for name, (preset, sets) in study.CANDIDATES.items():
        args = ["--preset", preset, "--steps", "10"] + [a for s in sets for a in ("--set", s)]
        cfg, model, chosen, _ = parse_args(args)
        cfg, overrides, _ = settle_settings(cfg, model, None, None, chosen)     # the trainer's own checks
        net = QGMRN(get_config(cfg.preset, **overrides))
        size = net.cfg.image_size
        out = net.eval()(torch.zeros(2, 3, size, size), torch.ones(2, 5, dtype=torch.long), torch.tensor([5, 3]))
        assert out.logits.shape == (2, net.cfg.num_answers), name


def test_the_model_card_says_how_much_the_routing_carries_the_question():
    """Issue 39: the card reports routing use where it reports accuracy (filters executed, gates on
    for every question, gates that differ between two questions about one image, per type)."""
    import numpy as np
    from qgmrn.routing import routing_use
    card_markdown = _module("make_builtin").card_markdown
    gates = np.zeros((4, 2, 3), dtype=np.int64)
    gates[:, 0, 0] = 1                                       # always on
    gates[0, 1, 1] = gates[2, 1, 2] = 1                      # question-dependent
    use = routing_use(gates, (3, 3), ["a", "a", "b", "b"], ["count", "exist", "count", "exist"])
    result = {"n": 4, "overall": 0.5, "per_type": {"count": 0.5, "exist": 0.5},
              "per_subtype": {"count": 0.5, "exist": 0.5},
              "routing": {"overall_execution_ratio": 0.25, "per_layer": [{"mean": 0.33, "q1": 0.33, "q3": 0.33}] * 2,
                          "use": use}}
    card = {"generated_val": result, "real_clevr_val": result, "data": {"renderer": "blender"},
            "parity": {"samples": 4, "max_abs_logit_diff": 0.0, "top1_agreement": 1.0, "gate_agreement": 1.0,
                       "route_logits_within_eps": 0, "eps": 1e-3},
            "parity_inputs": "x", "bytes": 1024, "parameters": 10, "checkpoint_sha256": "0" * 64}
    text = card_markdown(card)
    line = next(l for l in text.splitlines() if l.startswith("Routing use (blender val (held apart), 4 questions)"))
    assert "25.0% of filters executed" in line and "1 of 6 gates on for every question" in line
    assert "16.7% differ between two questions about one image" in line     # pairs (0,1), (2,3): 1 of 6 each
    assert "count 33%" in line and "exist 17%" in line


def test_the_study_report_puts_train_beside_val_and_the_routing_use_at_each_runs_end(tmp_path):
    """Issue 39 ranks rows by val with train beside it and the routing's use: the report's last
    table reads them from each run's metrics.jsonl (train: the mean of the last 500 steps' batches)."""
    study = _module("learning_study")
    run = tmp_path / "study" / "arm"
    run.mkdir(parents=True)
    use = {"questions": 10, "modules": 176, "filters_executed": 0.6, "always_on": 2, "differ_same_image": 0.4}
    recs = [{"step": s, "acc": 0.5 if s <= 500 else 0.7, "loss": 1.0} for s in range(100, 1100, 100)]
    recs += [{"step": 500, "split": "val", "samples": 32000, "train_seconds": 30.0, "overall": 0.45,
              "per_type": {"count": 0.3, "query_attribute": 0.4}}]
    recs += [{"step": 1000, "split": "val", "samples": 64000, "train_seconds": 60.0, "overall": 0.55,
              "per_type": {"count": 0.4, "query_attribute": 0.5}, "routing": use}]      # as the trainer logs it
    (run / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
    assert study.main(["report", str(tmp_path / "study"), "--docs", str(tmp_path / "docs")]) == 0
    text = (tmp_path / "docs" / "study.md").read_text()
    assert "| arm | 64k | 55.0 | 50.0 | 70.0 | 40.0 | 50.0 | 60.0% | 2 of 176 | 40.0% |" in text
