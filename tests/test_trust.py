"""Nothing lost, nothing wrong: runs, exports and inputs a user can trust (issue 11's scenarios)."""
import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import runtime
import qgmrn.train as train_mod
from conftest import REPO, save_random_checkpoint, tiny_train_config, with_metadata
from export.to_onnx import main as to_onnx_main
from qgmrn.checkpoint import load_checkpoint
from qgmrn.data.prepare import ImageCache, default_cache_dir, open_cache
from qgmrn.data.sources import DataError, load_jsonl
from qgmrn.evaluate import main as evaluate_main
from qgmrn.preprocess import ImageError, load_rgb
from qgmrn.train import TrainingStopped, train

quiet = dict(log=lambda *a, **k: None)


def _run_train(args, capsys):
    try:
        code = train_mod.main(args)
    except SystemExit as e:                     # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


# -- export ------------------------------------------------------------------------------------
def test_export_into_a_run_folder_keeps_the_run_and_needs_overwrite_to_replace(tiny_checkpoint, tiny_data, tmp_path,
                                                                              capsys):
    run = tmp_path / "run"
    shutil.copytree(tiny_checkpoint.parent, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    args = [str(run / "ckpt.pt"), "--out", str(run), "--data-root", str(tiny_data), "--parity-samples", "8"]
    assert to_onnx_main(args) == 0
    assert (run / "model.onnx").exists() and (run / "parity.json").exists()
    assert to_onnx_main(args) == 2                                     # an export is there: refused
    assert "--overwrite" in capsys.readouterr().err
    assert to_onnx_main(args + ["--overwrite"]) == 0
    for name, data in before.items():                                 # the run's own files are untouched
        assert (run / name).read_bytes() == data, name
    assert not list(tmp_path.glob(".*partial"))


def test_a_killed_exports_old_staging_is_removed_but_a_live_one_is_not(tiny_checkpoint, tiny_data, tmp_path):
    out = tmp_path / "bundle"
    old, live = tmp_path / f".{out.name}.dead.partial", tmp_path / f".{out.name}.live.partial"
    for d in (old, live):
        d.mkdir()
        (d / "model.onnx").write_bytes(b"half")
    os.utime(old, (1, 1))
    args = [str(tiny_checkpoint), "--out", str(out), "--data-root", str(tiny_data), "--parity-samples", "4"]
    assert to_onnx_main(args) == 0 and (out / "model.onnx").exists()
    assert not old.exists() and (live / "model.onnx").exists()


def test_nan_weights_fail_parity_and_nothing_is_published(tmp_path, tiny_data, capsys):
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    state = torch.load(ckpt, weights_only=True)
    state["model"]["head.mlp.2.weight"].fill_(float("nan"))
    torch.save(state, ckpt)
    code = to_onnx_main([str(ckpt), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                         "--parity-samples", "8"])
    assert code == 1
    assert "non-finite" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()
    report = json.loads((tmp_path / "b.failed" / "parity.json").read_text())     # strict JSON, no NaN
    assert report["passed"] is False


def test_a_checkpoint_whose_answers_do_not_fit_its_classifier_is_not_exported(tmp_path, capsys):
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    state = torch.load(ckpt, weights_only=True)
    state["answers"] = state["answers"][:-1]
    torch.save(state, ckpt)
    assert to_onnx_main([str(ckpt), "--out", str(tmp_path / "b")]) == 2
    assert "does not match" in capsys.readouterr().err and not (tmp_path / "b").exists()


def test_parity_samples_zero_is_a_usage_error(tmp_path, capsys):
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    assert to_onnx_main([str(ckpt), "--out", str(tmp_path / "b"), "--parity-samples", "0"]) == 2
    assert "parity-samples" in capsys.readouterr().err and not (tmp_path / "b").exists()


# -- runtime -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def onnx_file(tiny_bundle):
    return tiny_bundle / "model.onnx"


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(answers=m["answers"][:-1]), "scores"),
    (lambda m: m.update(answers=[m["answers"][0]] * len(m["answers"])), "distinct"),
    (lambda m: m.update(layer_sizes=m["layer_sizes"] + [4]), "routes"),
    (lambda m: m.update(vocab=["a", "b"]), "vocabulary"),
])
def test_metadata_that_disagrees_with_the_graph_is_refused_at_load(onnx_file, tmp_path, change, message):
    bad = with_metadata(onnx_file, tmp_path / "bad.onnx", change)
    with pytest.raises(runtime.ModelError, match=message):
        runtime.load(bad)


def test_non_finite_outputs_are_refused(onnx_file, real_sample):
    model = runtime.load(onnx_file)
    real_run = model._runner.run
    model._runner.run = lambda feeds: {**real_run(feeds), "logits": np.full((1, len(model.answers)), np.nan,
                                                                           dtype=np.float32)}
    with pytest.raises(runtime.ModelError, match="non-finite"):
        model.answer(real_sample / "images/val/CLEVR_val_000010.png", "How many cubes are there?")


def test_answer_batch_refuses_one_string_for_many_questions(onnx_file, real_sample):
    model = runtime.load(onnx_file)
    image = real_sample / "images/val/CLEVR_val_000010.png"
    with pytest.raises(ValueError, match="list of strings"):
        model.answer_batch([image] * 3, "abc")


def test_cli_top_k_zero_is_a_usage_error(onnx_file, real_sample):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "runtime", str(real_sample / "images/val/CLEVR_val_000010.png"),
                        "How many cubes?", "--model", str(onnx_file), "--top-k", "0"],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "--top-k must be at least 1" in r.stderr


# -- images ------------------------------------------------------------------------------------
def _png(array, mode=None, fmt="PNG"):
    b = io.BytesIO()
    (Image.fromarray(array, mode) if mode else Image.fromarray(array)).save(b, fmt)
    return b.getvalue()


def test_16_bit_and_float_images_are_scaled_not_clipped(real_sample):
    gray8 = np.asarray(Image.open(real_sample / "images/val/CLEVR_val_000010.png").convert("L"))
    as16 = (gray8.astype(np.uint16) * 257)
    got16 = np.asarray(load_rgb(_png(as16)))[..., 0].astype(int)
    assert np.abs(got16 - gray8).max() <= 1                          # not all white
    asf = (gray8.astype(np.float32) / 255.0)
    gotf = np.asarray(load_rgb(_png(asf, fmt="TIFF")))[..., 0].astype(int)
    assert np.abs(gotf - gray8).max() <= 1                           # not all black


def test_meaningless_float_ranges_and_bombs_are_image_errors(monkeypatch):
    with pytest.raises(ImageError, match="float pixels"):
        load_rgb(_png(np.full((8, 8), -3.0, dtype=np.float32), fmt="TIFF"))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageError, match="too large"):
        load_rgb(_png(np.zeros((40, 40, 3), dtype=np.uint8)))


# -- training runs -----------------------------------------------------------------------------
def test_resuming_a_finished_run_changes_nothing(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=3), **quiet)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, _ = _run_train(["--resume", "--out", str(out)], capsys)
    assert code == 0
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, _ = _run_train(["--resume", "--out", str(out), "--steps", "4"], capsys)      # extends
    assert code == 0 and load_checkpoint(out / "ckpt.pt")["step"] == 4
    assert "overall" in json.loads((out / "eval.json").read_text())


def test_resume_restores_the_runs_settings_and_refuses_contradictions(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2, batch_size=4, lr=2e-3), **quiet)
    code, err = _run_train(["--resume", "--out", str(out), "--lr", "0.1", "--steps", "3"], capsys)
    assert code == 2 and "contradicts its lr=0.002" in err
    code, err = _run_train(["--resume", "--out", str(out), "--steps", "3", "--set", "hidden_dim=64"], capsys)
    same = load_checkpoint(out / "ckpt.pt")["model_config"]["hidden_dim"]
    assert code == 2 and "cannot change it" in err and f"hidden_dim=64 (the checkpoint has {same})" in err
    code, _ = _run_train(["--resume", "--out", str(out), "--steps", "3",       # the starting command's
                          "--set", f"hidden_dim={same}"], capsys)              # own model setting
    state = load_checkpoint(out / "ckpt.pt")
    assert code == 0 and state["step"] == 3
    assert state["train_config"]["batch_size"] == 4 and state["train_config"]["lr"] == 2e-3
    assert state["train_config"]["data_root"] == str(tiny_data) and state["train_config"]["preset"] == "tiny"


def test_a_folder_holding_a_run_is_not_replaced_without_overwrite(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2), **quiet)
    before = (out / "ckpt.pt").read_bytes()
    base = ["--data-root", str(tiny_data), "--preset", "tiny", "--steps", "2", "--batch-size", "8", "--out", str(out)]
    code, err = _run_train(base, capsys)
    assert code == 2 and "already holds a training run" in err and (out / "ckpt.pt").read_bytes() == before
    code, _ = _run_train(base + ["--overwrite"], capsys)
    assert code == 0 and len((out / "metrics.jsonl").read_text().splitlines()) > 0


@pytest.mark.parametrize("args, message", [
    (["--batch-size", "0"], "batch_size must be at least 1"),
    (["--set", "log_every=0"], "log_every must be at least 1"),
    (["--set", "save_every=0"], "save_every must be at least 1"),
    (["--set", "steps=two"], "expected an integer"),
    (["--set", "no_such_field=1"], "unknown ModelConfig field"),
    (["--set", "cardinality=3"], "not divisible"),
    (["--lr", "1e30"], "lr must lie in"),
])
def test_bad_settings_fail_before_any_work(tmp_path, capsys, args, message):
    out = tmp_path / "never"
    code, err = _run_train(["--preset", "tiny", "--out", str(out)] + args, capsys)
    assert code == 2 and message in err
    assert not out.exists()


@pytest.mark.parametrize("content, message", [
    ({"model": {"no_such": 1}}, "unknown ModelConfig field"),
    ([1, 2], "expected a JSON object"),
    ({"steps": "two"}, "expected an integer"),
])
def test_bad_config_files_fail_clearly(tmp_path, capsys, content, message):
    (tmp_path / "c.json").write_text(json.dumps(content))
    code, err = _run_train(["--config", str(tmp_path / "c.json"), "--out", str(tmp_path / "never")], capsys)
    assert code == 2 and message in err and not (tmp_path / "never").exists()


def test_flags_override_the_config_file_which_overrides_defaults(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"steps": 7, "lr": 0.002, "model": {"hidden_dim": 24}}))
    cfg, model, chosen, _ = train_mod.parse_args(["--config", str(tmp_path / "c.json"), "--lr", "0.003",
                                                  "--preset", "tiny"])
    assert cfg.steps == 7 and cfg.lr == 0.003 and model == {"hidden_dim": 24} and cfg.batch_size == 64


def test_model_overrides_with_init_from_are_refused(tiny_checkpoint, tiny_data, tmp_path, capsys):
    code, err = _run_train(["--init-from", str(tiny_checkpoint), "--data-root", str(tiny_data), "--out",
                            str(tmp_path / "ft"), "--steps", "1", "--set", "hidden_dim=64"], capsys)
    assert code == 2 and "cannot change it" in err


def test_non_finite_loss_before_any_checkpoint_says_so(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setattr(train_mod, "load_balancing_loss", lambda g, s: g.sum() * float("nan"))
    with pytest.raises(TrainingStopped, match="No checkpoint was written yet"):
        train(tiny_train_config(tiny_data, tmp_path, steps=3), **quiet)


def test_progress_lines_when_stderr_is_not_a_terminal(tiny_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "qgmrn.train", "--data-root", str(tiny_data), "--preset", "tiny",
                        "--steps", "6", "--batch-size", "8", "--out", str(tmp_path / "r"), "--set", "log_every=1",
                        "--set", "progress_every=0.001"], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stderr.splitlines() if l.startswith("step ")]
    assert lines and "/6" in lines[0] and "samples/s" in lines[0] and "ETA" in lines[0]
    assert "\r" not in r.stderr                                           # no progress bar in a log


def test_orphaned_temporary_checkpoints_are_removed(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    orphan = out / "ckpt.pt.abc123.tmp"
    orphan.write_bytes(b"partial")
    os.utime(orphan, (1, 1))
    train(tiny_train_config(tiny_data, out, steps=1), **quiet)
    assert not orphan.exists()


def test_val_answers_never_seen_in_training_are_counted(tiny_data, tmp_path):
    said = []
    image = next((tiny_data / "images" / "train").iterdir())
    rows = [{"image": str(image), "question": "Is it red?", "answer": "yes"}] * 8
    (tmp_path / "t.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (tmp_path / "v.jsonl").write_text(json.dumps({"image": str(image), "question": "Is it glorp?", "answer": "maybe"}))
    train(tiny_train_config(None, tmp_path / "r", jsonl=(str(tmp_path / "t.jsonl"), str(tmp_path / "v.jsonl")),
                            steps=1), log=said.append)
    text = "\n".join(map(str, said))
    assert "1 of 1 val questions have an answer never seen" in text and "never seen in training (read as UNK)" in text


# -- data and caches ---------------------------------------------------------------------------
def test_a_list_answer_in_jsonl_is_refused(tmp_path, real_sample):
    image = real_sample / "images/val/CLEVR_val_000010.png"
    (tmp_path / "d.jsonl").write_text(json.dumps({"image": str(image), "question": "Is it red?", "answer": ["yes"]}))
    with pytest.raises(DataError, match="line 1: field 'answer' should be a string"):
        load_jsonl(tmp_path / "d.jsonl")


def test_a_cache_built_before_images_changed_is_rebuilt(tmp_path, real_sample):
    data = tmp_path / "data"
    shutil.copytree(real_sample / "images" / "val", data)
    images = sorted(str(p) for p in data.iterdir())[:4]
    where = tmp_path / "cache"
    cache = open_cache(where, "val", 16, images, build=True, log=lambda *a: None)
    assert cache.covers(images)
    Image.new("RGB", (480, 320), (255, 0, 0)).save(images[0])          # the image changes
    assert not ImageCache(where, "val", 16).covers(images)
    said = []
    cache = open_cache(where, "val", 16, images, build=True, log=said.append)
    assert "stale" in said[0] and np.asarray(cache.get(images[0]))[0, 0, 0] == 255


def test_training_on_read_only_data_puts_the_cache_elsewhere(tiny_data, tmp_path, monkeypatch):
    """(Read-only folders cannot be made for root, so os.access says what a read-only mount would.)"""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("qgmrn-cache"))
    monkeypatch.setenv("QGMRN_CACHE", str(tmp_path / "home-cache"))
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(data)) else real_access(p, mode))
    assert str(default_cache_dir(data)).startswith(str(tmp_path / "home-cache" / "images"))
    train(tiny_train_config(data, tmp_path / "run", steps=1), **quiet)
    assert not (data / "qgmrn-cache").exists()
    assert list((tmp_path / "home-cache" / "images").glob("*/train_32.u8"))


def test_evaluate_skips_questions_over_the_limit_and_checks_outputs_first(tiny_checkpoint, tiny_data, tmp_path,
                                                                          capsys):
    with pytest.raises(SystemExit) as e:
        evaluate_main([str(tiny_checkpoint), "--batch-size", "0"])
    assert e.value.code == 2
    assert evaluate_main([str(tiny_checkpoint), "--json", str(tmp_path / "no" / "dir" / "e.json")]) == 2
    assert "cannot write there" in capsys.readouterr().err
    image = next((tiny_data / "images" / "val").iterdir())
    long_q = "Is there " + "a big red cube and " * 30 + "a ball?"
    rows = [{"image": str(image), "question": long_q, "answer": "yes"},
            {"image": str(image), "question": "Is there a cube?", "answer": "yes"}]
    (tmp_path / "e.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    assert evaluate_main([str(tiny_checkpoint), "--jsonl", str(tmp_path / "e.jsonl")]) == 0
    captured = capsys.readouterr()
    assert "1 question(s) longer than the model's limit" in captured.err and "accuracy on 1 questions" in captured.out


def test_a_full_disk_stops_training_with_one_clear_message(tiny_data, tmp_path, monkeypatch):
    import errno

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(train_mod, "save_checkpoint", full)
    with pytest.raises(TrainingStopped, match=r"cannot write the checkpoint .* \(No space left on device\)") as e:
        train(tiny_train_config(tiny_data, tmp_path / "r", steps=2, save_every=1), **quiet)
    assert e.value.code == 1


def test_a_data_folder_marked_read_only_gets_no_cache_even_for_root(tiny_data, tmp_path, monkeypatch):
    """Root may write anywhere; a folder whose mode has no write bit (like ../shared/data) is still
    left untouched: the cache goes under $QGMRN_CACHE."""
    data = tmp_path / "data"
    shutil.copytree(tiny_data, data, ignore=shutil.ignore_patterns("qgmrn-cache"))
    monkeypatch.setenv("QGMRN_CACHE", str(tmp_path / "home-cache"))
    os.chmod(data, 0o555)
    try:
        assert str(default_cache_dir(data)).startswith(str(tmp_path / "home-cache" / "images"))
    finally:
        os.chmod(data, 0o755)
    assert default_cache_dir(data) == data / "qgmrn-cache"
