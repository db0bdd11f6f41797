"""What a user relies on, round 2 (issue 21): each test is a scenario that went wrong before and a
promise now kept: one clear line, a non-zero exit, nothing lost."""
import dataclasses
import importlib.util
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
from conftest import tiny_train_config, with_metadata
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


# -- exports and bundles --------------------------------------------------------------------------
@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


@pytest.mark.parametrize("change, message", [
    (lambda m: m.update(vocab=m["vocab"] + [f"w{i}" for i in range(500)]), "vocabulary has"),
    (lambda m: m.update(vocab=m["vocab"][:10]), "vocabulary has"),
    (lambda m: m.update(image_size=m["image_size"] * 2), "image_size"),
    (lambda m: m.update(image_size=0), "not a positive integer"),
    (lambda m: m.update(image_size="abc"), "not a positive integer"),
    (lambda m: m.update(image_size=[64]), "not a positive integer"),
])
def test_metadata_that_does_not_fit_the_graph_is_refused_at_load(bundle, tmp_path, change, message):
    bad = with_metadata(bundle / "model.onnx", tmp_path / "bad.onnx", change)
    for backend in ("cpu", "openvino") if importlib.util.find_spec("openvino") else ("cpu",):
        with pytest.raises(runtime.ModelError, match=message):
            runtime.load(bad, backend=backend)


def test_a_graph_fixed_at_another_image_size_is_refused_even_if_its_config_agrees(bundle, tmp_path):
    def change(m):
        m["image_size"] *= 2
        m["model_config"]["image_size"] *= 2
    bad = with_metadata(bundle / "model.onnx", tmp_path / "bad.onnx", change)
    with pytest.raises(runtime.ModelError, match="takes"):
        runtime.load(bad, backend="cpu")


def test_a_bundle_whose_model_was_altered_after_export_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    data = bytearray((copy / "model.onnx").read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 2000):   # flip bytes inside the weights
        data[i] ^= 0x55
    (copy / "model.onnx").write_bytes(bytes(data))
    with pytest.raises(runtime.ModelError, match="sha256"):
        runtime.load(copy)
    assert runtime.load(bundle).answers                     # the untouched bundle loads


def test_a_bundle_whose_parity_failed_is_refused(bundle, tmp_path):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    report = json.loads((copy / "parity.json").read_text())
    report["passed"] = False
    (copy / "parity.json").write_text(json.dumps(report))
    with pytest.raises(runtime.ModelError, match="failed its parity check"):
        runtime.load(copy)


def _poisoned(tmp_path, name, value):
    import torch
    from conftest import save_random_checkpoint
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    state = torch.load(ckpt, weights_only=True)
    from qgmrn.preprocess import UNK_ID
    weight = state["model"][name]
    weight[UNK_ID if weight.dim() == 2 else 1] = value   # the unknown word's row: parity never reads it
    torch.save(state, ckpt)
    return ckpt


@pytest.mark.parametrize("name, value", [("text.embed.weight", float("nan")), ("text.gru.bias_hh_l0", float("inf"))])
def test_weights_no_parity_input_reaches_still_fail_export(tmp_path, tiny_data, capsys, name, value):
    import torch
    from conftest import save_random_checkpoint
    probe = torch.load(save_random_checkpoint(tmp_path / "probe.pt", "tiny"), weights_only=True)["model"]
    if name not in probe:
        pytest.skip(f"the tiny model has no {name}: {sorted(k for k in probe if 'text' in k or 'embed' in k)[:6]}")
    ckpt = _poisoned(tmp_path, name, value)
    code = to_onnx_main([str(ckpt), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                         "--parity-samples", "8"])
    assert code == 1 and "non-finite weights" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()


def test_evaluate_refuses_a_checkpoint_whose_answers_do_not_fit_like_export(tmp_path, tiny_data, capsys):
    import torch
    from conftest import save_random_checkpoint
    from qgmrn.evaluate import main as evaluate_main
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    state = torch.load(ckpt, weights_only=True)
    state["answers"] = state["answers"][:-1]
    torch.save(state, ckpt)
    assert evaluate_main([str(ckpt), "--data-root", str(tiny_data)]) == 2
    assert "does not match its classifier" in capsys.readouterr().err


# -- data ------------------------------------------------------------------------------------------
def test_jsonl_type_lists_and_non_utf8_lines_name_the_file_and_line(tmp_path, real_sample):
    from qgmrn.data.sources import DataError, load_jsonl
    image = str(real_sample / "images/val/CLEVR_val_000010.png")
    (tmp_path / "t.jsonl").write_text(json.dumps({"image": image, "question": "Is it red?", "answer": "no",
                                                  "type": ["x"]}) + "\n")
    with pytest.raises(DataError, match=r"t.jsonl: line 1: field 'type' should be a string"):
        load_jsonl(tmp_path / "t.jsonl")
    good = json.dumps({"image": image, "question": "Is it red?", "answer": "no"}).encode()
    (tmp_path / "u.jsonl").write_bytes(good + b"\n" + good.replace(b"red", b"r\xffd") + b"\n")
    with pytest.raises(DataError, match=r"u.jsonl: line 2: not UTF-8"):
        load_jsonl(tmp_path / "u.jsonl")


def test_training_evaluation_skips_questions_over_the_limit_as_evaluate_does(tiny_data, tmp_path):
    from qgmrn.train.run import within_limit
    from qgmrn.data.sources import load_clevr
    val = load_clevr(tiny_data, "val")
    long_q = dataclasses.replace(val[0], question="Is there " + "a big red cube and " * 30 + "a ball?")
    kept, skipped = within_limit(val + [long_q], 64)
    assert skipped == 1 and len(kept) == len(val)


def test_ablate_refuses_settings_that_would_mislabel_the_papers_rows(tmp_path, capsys):
    from qgmrn.ablate import main as ablate_main
    with pytest.raises(SystemExit) as e:
        ablate_main(["--out", str(tmp_path / "a"), "--set", "preset=tiny"])
    assert e.value.code == 2 and "fixes these" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()


# -- two processes at once -------------------------------------------------------------------------
def test_a_second_training_into_the_same_folder_stops_and_names_the_holder(tiny_data, tmp_path):
    from qgmrn.settings import SettingsError
    from qgmrn.train.resume import RunFolderLock
    out = tmp_path / "run"
    out.mkdir()
    held = RunFolderLock(out)                    # a training process in that folder
    try:
        with pytest.raises(SettingsError, match=f"being trained by pid {os.getpid()}"):
            train(tiny_train_config(tiny_data, out, steps=2), **quiet)
        assert not (out / "ckpt.pt").exists() and not (out / "config.json").exists()
    finally:
        held.release()
    train(tiny_train_config(tiny_data, out, steps=2), **quiet)   # free again: trains
    assert (out / "ckpt.pt").exists() and not (out / ".training").exists()


def test_two_processes_building_one_image_cache_both_finish(tiny_data, tmp_path):
    import multiprocessing
    from qgmrn.data.prepare import ImageCache
    images = [str(p) for p in sorted((tiny_data / "images" / "train").iterdir())]
    ctx = multiprocessing.get_context("fork")
    procs = [ctx.Process(target=_build_cache, args=(images, tmp_path / "cache")) for _ in range(3)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0]
    assert ImageCache.find(tmp_path / "cache", "train", 16).covers(images)
    assert not list((tmp_path / "cache").glob("*.tmp"))


def _build_cache(images, cache_dir):
    from qgmrn.data.prepare import prepare
    prepare(images, cache_dir, "train", 16, workers=1)


def test_an_absurd_cache_size_is_refused_and_leaves_nothing(tmp_path, capsys):
    from qgmrn.data.prepare import main as prepare_main
    assert prepare_main(["--data-root", str(tmp_path), "--size", "100000"]) == 2
    assert "1..1024" in capsys.readouterr().err and not list(tmp_path.rglob("*.tmp"))


def test_a_cache_that_would_not_fit_on_the_disk_is_refused_before_writing(tiny_data, tmp_path, monkeypatch):
    import collections
    from qgmrn.data import prepare as prep
    from qgmrn.data.sources import DataError
    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(prep.shutil, "disk_usage", lambda p: usage(10**6, 10**6 - 1000, 1000))
    images = [str(p) for p in sorted((tiny_data / "images" / "train").iterdir())]
    with pytest.raises(DataError, match="GiB free"):
        prep.prepare(images, tmp_path / "cache", "train", 64, workers=1)
    assert not list((tmp_path / "cache").glob("*"))


def test_a_bundle_with_a_corrupt_engine_description_falls_back_to_onnx(bundle, tmp_path, caplog):
    copy = tmp_path / "b"
    shutil.copytree(bundle, copy)
    (copy / "model.engine").write_bytes(b"not an engine")
    (copy / "model.engine.json").write_text("{broken")
    model = runtime.load(copy)                               # auto: the next backend answers
    assert "onnxruntime" in model.backend and model.answers
    with pytest.raises(runtime.ModelError, match=r"model.engine.json is unreadable"):
        runtime.load(copy / "model.engine", backend="tensorrt")


_SIGTERM_MIDWAY = """
import os, signal, sys
from export import bundle
from export.to_onnx import main
real = bundle.run_torch

def killed_midway(*a, **k):                      # SIGTERM arrives while parity runs
    os.kill(os.getpid(), signal.SIGTERM)
    return real(*a, **k)

bundle.run_torch = killed_midway
sys.exit(main(sys.argv[1:]))
"""


def test_an_export_stopped_by_sigterm_leaves_no_staging_and_says_so(tiny_checkpoint, tiny_data, tmp_path):
    # In its own process: a signal sent to the test process would reach whatever threads earlier tests
    # left there (in the full suite it once crashed the test process, not the export).
    import signal as signal_
    import subprocess
    import sys
    from conftest import REPO
    out = tmp_path / "b"
    proc = subprocess.run([sys.executable, "-c", _SIGTERM_MIDWAY, str(tiny_checkpoint), "--out", str(out),
                           "--data-root", str(tiny_data), "--parity-samples", "8"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.returncode == 128 + signal_.SIGTERM, proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == "error: stopped by SIGTERM; nothing was published"
    assert "Traceback" not in proc.stderr
    assert not out.exists() and not list(tmp_path.glob(".b.*"))


def test_a_second_export_into_the_same_folder_is_refused_while_the_first_runs(tiny_checkpoint, tmp_path, capsys):
    from qgmrn.files import FileLock
    out = tmp_path / "b"
    held = FileLock(tmp_path / ".b.export-lock", "first")     # the first export, still running
    try:
        assert to_onnx_main([str(tiny_checkpoint), "--out", str(out), "--parity-samples", "8"]) == 2
        assert f"in use by pid {os.getpid()}" in capsys.readouterr().err and not out.exists()
    finally:
        held.release()
    assert not (tmp_path / ".b.export-lock").exists()


def test_an_export_onto_a_full_disk_is_one_line_and_publishes_nothing(tiny_checkpoint, tiny_data, tmp_path, capsys,
                                                                      monkeypatch):
    import errno
    from export import bundle as bundle_mod

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "b"))
    monkeypatch.setattr(bundle_mod, "export_onnx", full)
    code = to_onnx_main([str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                         "--parity-samples", "8"])
    err = capsys.readouterr().err
    assert code == 1 and "No space left on device" in err and err.count("\n") == 1
    assert not (tmp_path / "b").exists() and not list(tmp_path.glob(".b.*"))


def test_a_graph_with_a_non_finite_weight_is_refused_at_load(bundle, tmp_path):
    import onnx
    from onnx import numpy_helper
    m = onnx.load(str(bundle / "model.onnx"))
    init = next(t for t in m.graph.initializer if t.data_type == onnx.TensorProto.FLOAT and len(t.dims) == 2)
    arr = numpy_helper.to_array(init).copy()
    arr[1, 0] = np.nan
    init.CopyFrom(numpy_helper.from_array(arr, init.name))
    onnx.save(m, str(tmp_path / "nan.onnx"))
    for backend in ("cpu", "openvino") if importlib.util.find_spec("openvino") else ("cpu",):
        with pytest.raises(runtime.ModelError, match="non-finite weights"):
            runtime.load(tmp_path / "nan.onnx", backend=backend)


# -- concurrency ---------------------------------------------------------------------------------
BACKENDS = ["cpu"] + (["openvino"] if importlib.util.find_spec("openvino") else [])


@pytest.mark.parametrize("backend", BACKENDS)
def test_concurrent_calls_answer_as_serial_calls_on_every_backend(backend, real_sample):
    from concurrent.futures import ThreadPoolExecutor
    model = runtime.load("builtin", backend=backend)
    images = sorted((real_sample / "images" / "val").glob("*.png"))[:4]
    questions = ["How many cubes are there?", "What color is the large sphere?", "Is there a metal cylinder?"]
    inputs = [(str(i), q) for i in images for q in questions]
    serial = [model.predict(i, q) for i, q in inputs]

    def worker(offset):
        return [(k, model.predict(*inputs[k])) for k in ((offset + j) % len(inputs) for j in range(25))]
    with ThreadPoolExecutor(4) as pool:
        results = [r for rs in pool.map(worker, range(4)) for r in rs]
    assert len(results) == 100
    for k, pred in results:
        assert pred.answer == serial[k].answer and pred.gates == serial[k].gates
        assert pred.probability == pytest.approx(serial[k].probability, abs=1e-5)
