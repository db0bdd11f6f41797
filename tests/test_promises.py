"""What a user relies on, round 2 (issue 21): each test is a scenario that went wrong before and a
promise now kept: one clear line, a non-zero exit, nothing lost."""
import io
import json
import os
import shutil
import stat

import numpy as np
import pytest
from PIL import Image

import qgmrn.train as train_mod
import runtime
from conftest import tiny_train_config
from export.to_onnx import main as to_onnx_main
from qgmrn.data.generate import main as generate_main
from qgmrn.preprocess import MAX_PIXELS, ImageError, load_rgb
from qgmrn.train import train

quiet = dict(log=lambda *a, **k: None)


def _cli(args, capsys):
    try:
        code = train_mod.main(args)
    except SystemExit as e:                       # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


# -- runs ----------------------------------------------------------------------------------------
def test_a_run_with_relative_paths_resumes_from_another_directory(tiny_data, tmp_path, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(tiny_data, work / "D")
    monkeypatch.chdir(work)
    base = ["--data-root", "D", "--preset", "tiny", "--batch-size", "8", "--set", "warmup_steps=1",
            "--set", "save_every=2"]
    assert _cli(base + ["--steps", "2", "--out", "run"], capsys)[0] == 0
    monkeypatch.chdir(tmp_path)
    code, err = _cli(["--resume", "--out", "work/run", "--steps", "4"], capsys)
    assert code == 0, err
    code, err = _cli(["--resume", "--out", "work/run", "--steps", "6", "--data-root", str(work / "D")], capsys)
    assert code == 0, err                         # the same folder given absolutely is the same folder


def test_metrics_keep_no_rows_past_the_checkpoint_a_resume_continues_from(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=4), **quiet)
    with open(out / "metrics.jsonl", "a") as f:  # what a process killed after its last save wrote
        f.write(json.dumps({"step": 5, "loss": 1.0}) + "\n" + json.dumps({"step": 6, "loss": 1.0}) + "\n{\"ste")
    train(tiny_train_config(tiny_data, out, steps=6), resume=str(out / "ckpt.pt"), **quiet)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "split" not in r] == [1, 2, 3, 4, 5, 6]      # each step once


def test_a_new_run_after_a_kill_before_any_checkpoint_starts_its_metrics_afresh(tiny_data, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 9.0}) + "\n")
    train(tiny_train_config(tiny_data, out, steps=2), **quiet)
    assert 99 not in [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_overwriting_a_run_removes_the_export_of_the_replaced_checkpoint(tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2), **quiet)
    assert to_onnx_main([str(out / "ckpt.pt"), "--out", str(out), "--data-root", str(tiny_data),
                         "--parity-samples", "8"]) == 0
    assert to_onnx_main([str(out / "ckpt.pt"), "--data-root", str(tiny_data), "--parity-samples", "8"]) == 0
    train(tiny_train_config(tiny_data, out, steps=2, seed=1), overwrite=True, **quiet)
    assert not (out / "model.onnx").exists() and not (out / "parity.json").exists()
    assert not (out / "ckpt-export" / "model.onnx").exists()
    assert (out / "ckpt.pt").exists()


def test_the_checkpoint_has_the_mode_of_the_runs_other_files(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2), **quiet)
    assert stat.S_IMODE((out / "ckpt.pt").stat().st_mode) == stat.S_IMODE((out / "config.json").stat().st_mode)


@pytest.mark.parametrize("args, message", [
    (["--set", "cardinality=0"], "cardinality must be a positive integer"),
    (["--set", "stage_widths=0,8"], "stage_widths must be a positive integer"),
    (["--data-root", "somewhere", "--jsonl", "a.jsonl", "b.jsonl"], "--data-root (CLEVR layout) or --jsonl"),
])
def test_impossible_settings_are_one_line(tmp_path, capsys, args, message):
    code, err = _cli(args + ["--preset", "tiny", "--steps", "1", "--out", str(tmp_path / "r")], capsys)
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_an_out_that_is_a_file_is_one_line(tiny_data, tmp_path, capsys):
    afile = tmp_path / "afile"
    afile.write_text("mine")
    code, err = _cli(["--data-root", str(tiny_data), "--preset", "tiny", "--steps", "1", "--out", str(afile)], capsys)
    assert code == 2 and err.count("\n") == 1 and "afile" in err
    assert afile.read_text() == "mine"
    assert generate_main(["--out", str(afile), "--images", "2"]) == 1
    assert "Not a directory" in capsys.readouterr().err and afile.read_text() == "mine"


def test_generate_does_not_overwrite_a_dataset(tmp_path, capsys):
    out = tmp_path / "d"
    assert generate_main(["--out", str(out), "--images", "2", "--questions", "2"]) == 0
    before = (out / "questions" / "CLEVR_train_questions.json").read_bytes()
    assert generate_main(["--out", str(out), "--images", "3", "--questions", "2", "--seed", "5"]) == 1
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "questions" / "CLEVR_train_questions.json").read_bytes() == before
    assert generate_main(["--out", str(out), "--images", "3", "--questions", "2", "--overwrite"]) == 0


def test_generate_with_min_objects_above_max_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        generate_main(["--out", str(tmp_path / "d"), "--images", "2", "--objects", "5", "2"])
    assert e.value.code == 2 and "--objects" in capsys.readouterr().err


# -- images --------------------------------------------------------------------------------------
def test_a_phone_photo_stored_rotated_answers_like_the_upright_image(tmp_path):
    upright = np.zeros((40, 60, 3), np.uint8)
    upright[:10, :, 0] = 255                                  # a red band along the top
    stored = Image.fromarray(upright).transpose(Image.Transpose.ROTATE_90)   # the sensor's view
    exif = Image.Exif()
    exif[0x0112] = 6                                          # "rotate 90 CW to display"
    path = tmp_path / "phone.jpg"
    stored.save(path, exif=exif, quality=95)
    shown = np.asarray(load_rgb(str(path)))
    assert shown.shape == (40, 60, 3)
    assert shown[:10, :, 0].mean() > 200 and shown[30:, :, 0].mean() < 60
    assert np.asarray(load_rgb(Image.open(path))).shape == (40, 60, 3)


def test_an_image_claiming_too_many_pixels_is_refused_before_decoding(tmp_path):
    big = io.BytesIO()
    Image.new("1", (9000, 9000)).save(big, "PNG")             # 81 MP in a few KB
    assert 9000 * 9000 > MAX_PIXELS and len(big.getvalue()) < 100_000
    with pytest.raises(ImageError, match="megapixels"):
        load_rgb(big.getvalue())


def test_a_fifo_is_refused_not_waited_on(tmp_path):
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    with pytest.raises(ImageError, match="not a regular file"):
        load_rgb(str(fifo))


def test_odd_pil_images_are_image_errors_or_answers():
    la = Image.new("LA", (8, 8), (120, 255)).convert("La")
    assert load_rgb(la).mode == "RGB"
    closed = Image.new("RGB", (8, 8))
    closed.close()
    with pytest.raises(ImageError, match="closed"):
        load_rgb(closed)


@pytest.mark.parametrize("top_k", [2.5, "3", 0, True])
def test_top_k_must_be_a_positive_integer(top_k, real_sample):
    model = runtime.load("builtin", backend="cpu")
    with pytest.raises(ValueError, match="top_k must be a positive integer"):
        model.predict(str(real_sample / "images/val/CLEVR_val_000010.png"), "How many cubes are there?", top_k=top_k)
