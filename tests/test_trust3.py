"""What a user relies on, round 3 (issue 30): each test is a scenario that went wrong before and
a promise now kept: one clear line, a non-zero exit, nothing lost, nothing written where it was
not asked to be."""
import importlib.util
import json
import os
import shutil

import pytest

import qgmrn.train as train_mod
from conftest import REPO, tiny_train_config
from qgmrn.train import train
from qgmrn.train.resume import RunFolderLock

quiet = dict(log=lambda *a, **k: None)


def _cli(main, args, capsys):
    try:
        code = main(args)
    except SystemExit as e:                       # argparse usage errors
        code = e.code
    return code, capsys.readouterr().err


# -- 1, 4: --overwrite and live runs; lock and pid files ------------------------------------------
def test_overwrite_refuses_a_live_run_before_removing_anything(tiny_data, tmp_path, capsys):
    run = tmp_path / "runA"
    train(tiny_train_config(tiny_data, run), **quiet)
    before = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    live = RunFolderLock(run)                      # run A is still training
    try:
        code, err = _cli(train_mod.main, ["--data-root", str(tiny_data), "--preset", "tiny", "--steps", "2",
                                          "--out", str(run), "--overwrite"], capsys)
    finally:
        live.release()
    assert code == 2 and "is being trained by pid" in err and len(err.strip().splitlines()) == 1
    after = {p.name: p.read_bytes() for p in run.iterdir() if p.is_file()}
    assert {k: v for k, v in after.items() if k != ".training"} == before


def test_lock_and_pid_files_never_write_through_a_planted_symlink(tiny_data, tiny_checkpoint, tmp_path):
    from export.to_onnx import main as to_onnx_main
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    run = tmp_path / "run"
    run.mkdir()
    (run / ".training").symlink_to(target)
    train(tiny_train_config(tiny_data, run, steps=2), **quiet)
    (tmp_path / ".bundle.export-lock").symlink_to(target)
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(tmp_path / "bundle"), "--data-root", str(tiny_data),
                         "--parity-samples", "8"]) == 0
    assert target.read_text() == "keep me"


# -- 2, 3: the renderer's temp file; study tools read weights only -------------------------------
@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy not installed (pip install -e '.[render]')")
def test_the_visibility_render_never_writes_through_a_planted_symlink(tmp_path, monkeypatch):
    import random
    import tempfile
    from qgmrn.data import clevr_world as world
    from qgmrn.data.blender import BlenderRenderer
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    target = tmp_path / "precious.txt"
    target.write_text("keep me")
    (tmp_path / f"{os.getpid()}.visibility.png").symlink_to(target)
    renderer = BlenderRenderer(32, 22, samples=1, denoise=False)
    renderer.visible_pixels(world.sample_layout(random.Random(0), 2))
    assert target.read_text() == "keep me"


class _RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (self.marker,))


def test_cross_eval_never_unpickles_a_run_folder(tmp_path):
    import sys
    import torch
    sys.path.insert(0, str(REPO / "study"))
    import cross_eval
    marker = tmp_path / "code-ran"
    run = tmp_path / "film-run"
    run.mkdir()
    torch.save({"film": _RunsCode(str(marker)), "vocab": [], "answers": []}, run / "film.pt")
    with pytest.raises(Exception):
        cross_eval.load_run(run)
    assert not marker.exists()


# -- 5, 6, 7, 24: what runtime.load accepts -------------------------------------------------------
def _copy_bundle(bundle, tmp_path):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    return copy


def _with_raw_metadata(src, dst, raw: str):
    import onnx
    m = onnx.load(str(src))
    next(p for p in m.metadata_props if p.key == "qgmrn").value = raw
    onnx.save(m, str(dst))
    return dst


@pytest.fixture
def no_hang():
    import signal

    def hung(*_):
        raise AssertionError("runtime.load hung")
    old = signal.signal(signal.SIGALRM, hung)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero"])
def test_a_model_file_that_is_not_a_regular_file_is_refused_without_hanging(kind, tiny_bundle, tmp_path, no_hang):
    import runtime
    copy = _copy_bundle(tiny_bundle, tmp_path)
    (copy / "model.onnx").unlink()
    single = tmp_path / "single.onnx"
    for path in (copy / "model.onnx", single):
        if kind == "fifo":
            os.mkfifo(path)
        else:
            path.symlink_to("/dev/zero")
    for path in (copy, single):
        with pytest.raises(runtime.ModelError, match="not a regular file"):
            runtime.load(path)


@pytest.mark.parametrize("raw, field", [
    ("[1, 2]", "not an object"), ('"text"', "not an object"),
])
def test_metadata_that_is_not_an_object_is_a_model_error(raw, field, tiny_bundle, tmp_path):
    import runtime
    path = _with_raw_metadata(tiny_bundle / "model.onnx", tmp_path / "m.onnx", raw)
    with pytest.raises(runtime.ModelError, match=field):
        runtime.load(path)


@pytest.mark.parametrize("value", [["a", "b", "c"], [0.5, 0.5], "0.5", [float("nan"), 0.5, 0.5]])
def test_normalisation_metadata_of_the_wrong_shape_is_a_model_error(value, tiny_bundle, tmp_path):
    import runtime
    from conftest import with_metadata
    path = with_metadata(tiny_bundle / "model.onnx", tmp_path / "m.onnx", lambda meta: meta.update(mean=value))
    with pytest.raises(runtime.ModelError, match="mean"):
        runtime.load(path)


@pytest.mark.parametrize("change, match", [
    (lambda report: report.clear() or report.update(x=1) and None, "passed"),
    (lambda report: report.update(passed="no"), "passed='no'"),
    (lambda report: report["artefacts"]["onnx-fp32"].update(samples="many"), "samples"),
    (lambda report: report["artefacts"]["onnx-fp32"].update(file="../elsewhere.onnx"), "file"),
])
def test_tampered_parity_reports_are_refused_naming_the_field(change, match, tiny_bundle, tmp_path):
    import runtime
    copy = _copy_bundle(tiny_bundle, tmp_path)
    report = json.loads((copy / "parity.json").read_text())
    change(report)
    (copy / "parity.json").write_text(json.dumps(report))
    with pytest.raises(runtime.ModelError, match=match):
        runtime.load(copy)


def test_a_parity_report_that_is_a_list_or_missing_is_refused(tiny_bundle, tmp_path, capsys):
    import runtime
    from runtime.__main__ import main as runtime_main
    copy = _copy_bundle(tiny_bundle, tmp_path)
    (copy / "parity.json").write_text("[1]")
    with pytest.raises(runtime.ModelError, match="parity.json: expected a JSON object"):
        runtime.load(copy)
    (copy / "parity.json").unlink()                    # a swapped model.onnx must not load either
    with pytest.raises(runtime.ModelError, match="no parity.json"):
        runtime.load(copy)
    image = next((REPO.parent / "shared" / "data" / "clevr-real-sample" / "images" / "val").glob("*.png"), None)
    if image is not None:
        assert runtime_main([str(image), "What color is it?", "--model", str(copy)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "no parity.json" in err[0]


def test_a_card_row_cannot_point_outside_its_folder(tiny_bundle, tmp_path):
    import runtime
    folder = tmp_path / "models"
    folder.mkdir()
    shutil.copy(tiny_bundle / "model.onnx", folder / "m.onnx")
    report = json.loads((tiny_bundle / "parity.json").read_text())
    report["artefacts"]["openvino-bf16"] = dict(report["artefacts"]["onnx-fp32"], engine="openvino",
                                                precision="bf16", file="../outside.onnx", samples=1000)
    (folder / "m.json").write_text(json.dumps(report))
    with pytest.raises(runtime.ModelError, match="never a path"):
        runtime.load(folder / "m.onnx")


def test_a_corrupt_onnx_file_says_it_is_not_a_model_without_promising_a_next_backend(tmp_path, caplog):
    import runtime
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x08\x07garbage" * 100)
    with pytest.raises(runtime.ModelError, match="not a loadable ONNX model"):
        runtime.load(bad)
    assert "trying the next backend" not in caplog.text


# -- 8, 9: images ---------------------------------------------------------------------------------
def test_one_lazily_opened_pil_image_asked_many_questions_answers_like_the_file(tiny_bundle, real_sample):
    from PIL import Image
    import runtime
    model = runtime.load(tiny_bundle)
    path = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    questions = ["What color is the cube?", "How many spheres are there?"] * 8
    expected = model.answer_batch([path] * 16, questions)
    for _ in range(20):
        assert model.answer_batch([Image.open(path)] * 16, questions) == expected


def test_a_lazily_opened_truncated_image_is_an_image_error(tiny_bundle, real_sample, tmp_path):
    from PIL import Image
    import runtime
    data = sorted((real_sample / "images" / "val").glob("*.png"))[0].read_bytes()
    cut = tmp_path / "cut.png"
    cut.write_bytes(data[:len(data) // 2])
    with pytest.raises(runtime.ImageError):
        runtime.load(tiny_bundle).answer(Image.open(cut), "What color is the cube?")


def test_a_16_bit_image_decodes_without_full_size_float_copies(tmp_path):
    import tracemalloc
    import numpy as np
    from PIL import Image
    from qgmrn.preprocess import load_rgb
    side = 3000
    ramp = (np.arange(side * side, dtype=np.uint32) % 65536).astype(np.uint16).reshape(side, side)
    path = tmp_path / "wide.png"
    Image.fromarray(ramp).save(path)
    del ramp
    tracemalloc.start()
    rgb = load_rgb(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 6 * side * side          # the decoded int32 array, one band; float64 copies were 12+ B/px
    a = np.asarray(rgb)
    flat = a.reshape(-1, 3)[:, 0]                    # the ramp's value v becomes round(v * 255 / 65535)
    assert flat[65535] == 255 and flat[0] == 0 and flat[257] == 1 and flat[128] == 0 and flat[129] == 1


# -- 10, 15, 18, 19, 20, 21, 22, 23: settings and command lines -----------------------------------
@pytest.mark.parametrize("setting", ["load_weight=inf", "warmup_start_lr=nan", "warmup_start_lr=-1", "tau=inf",
                                     "progress_every=nan", "scene_weight=-1", "seed=" + "1" + "0" * 26, "seed=-3"])
def test_out_of_range_settings_are_one_line_before_anything_is_created(setting, tiny_data, tmp_path, capsys):
    out = tmp_path / "run"
    code, err = _cli(train_mod.main, ["--data-root", str(tiny_data), "--preset", "tiny", "--steps", "2",
                                      "--out", str(out), "--set", setting], capsys)
    lines = err.strip().splitlines()
    assert code == 2 and setting.split("=")[0] in lines[-1] and "Traceback" not in err, err
    if setting.startswith("seed"):
        assert "seed must lie in 0..4294967295" in lines[-1]
    assert not out.exists()


def _jsonl_without_words(tmp_path, real_sample):
    image = sorted((real_sample / "images" / "val").glob("*.png"))[0]
    good = {"image": str(image), "question": "What color is the cube?", "answer": "red"}
    path = tmp_path / "q.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps(dict(good, question="?! ...")) + "\n")
    return path


def test_a_jsonl_question_without_words_names_its_file_and_line_before_any_image_is_read(
        tmp_path, real_sample, capsys):
    path = _jsonl_without_words(tmp_path, real_sample)
    code, err = _cli(train_mod.main, ["--jsonl", str(path), str(path), "--preset", "tiny", "--steps", "1",
                                      "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache")], capsys)
    assert code == 2 and f"{path}: line 2" in err and "no words" in err
    assert not (tmp_path / "cache").exists()


def test_export_with_bad_parity_data_is_one_line_naming_the_file(tiny_checkpoint, tmp_path, real_sample, capsys):
    from export.to_onnx import main as to_onnx_main
    path = _jsonl_without_words(tmp_path, real_sample)
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(tmp_path / "b1"), "--jsonl", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "line 2" in err[0]
    data = tmp_path / "D"
    shutil.copytree(real_sample, data, ignore=shutil.ignore_patterns("humans"))
    first = sorted((data / "images" / "val").glob("*.png"))[0]
    first.write_bytes(first.read_bytes()[:300])                 # a truncated PNG among the parity images
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(tmp_path / "b2"), "--data-root", str(data)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and first.name in err[0] and not (tmp_path / "b2").exists()


def test_export_under_a_file_names_the_file(tiny_checkpoint, tmp_path, capsys):
    from export.to_onnx import main as to_onnx_main
    (tmp_path / "afile").write_text("x")
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(tmp_path / "afile" / "sub")]) == 2
    err = capsys.readouterr().err
    assert "afile is a file, not a folder" in err and "File exists" not in err


def test_a_failed_exports_folder_follows_the_umask(tiny_checkpoint, tiny_data, tmp_path, monkeypatch):
    import stat
    from export import bundle
    old = os.umask(0o077)
    try:
        stage = bundle.staging_dir(tmp_path / "out")
    finally:
        os.umask(old)
    assert stat.S_IMODE(stage.stat().st_mode) == 0o700
    shutil.rmtree(stage)


@pytest.mark.parametrize("args", [["--max-len", "-5"], ["--workspace-mib", "-1"]])
def test_to_trt_numbers_are_checked_before_the_export(args, tiny_checkpoint, tmp_path, capsys):
    from export.to_trt import main as to_trt_main
    code, err = _cli(to_trt_main, [str(tiny_checkpoint), "--out", str(tmp_path / "b"), *args], capsys)
    assert code == 2 and args[0] in err and not (tmp_path / "b").exists()


@pytest.mark.parametrize("args", [["--workers", "-1"], ["--workers", "0"], ["--val-images", "-5"],
                                  ["--renderer", "blender", "--samples", "0"],
                                  ["--renderer", "blender", "--size", "30000", "30000"]])
def test_generate_checks_its_numbers_before_any_work(args, tmp_path, capsys):
    from qgmrn.data.generate import main as generate_main
    out = tmp_path / "data"
    code, err = _cli(generate_main, ["--out", str(out), "--images", "2", *args], capsys)
    assert code == 2 and args[-2] in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.parametrize("module", ["qgmrn.train", "export.to_onnx", "export.to_trt"])
def test_on_a_base_install_training_and_export_say_what_to_install(module, tmp_path):
    import subprocess
    import sys
    (tmp_path / "sitecustomize.py").write_text("import sys\nsys.modules['torch'] = None   # a base install\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO)]))
    done = subprocess.run([sys.executable, "-m", module, "x.pt"], capture_output=True, text=True, env=env,
                          cwd=tmp_path, timeout=120)
    err = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(err) == 1 and "pip install torch==2.13.0" in err[0], done.stderr


# -- 11, 12: export.benchmark ---------------------------------------------------------------------
def test_benchmark_of_a_relative_bundle_times_every_row_with_pytorch(tiny_checkpoint, tiny_data, real_sample,
                                                                      tmp_path, monkeypatch, capsys):
    from export.benchmark import main as bench_main
    from export.to_onnx import main as to_onnx_main
    monkeypatch.chdir(tmp_path)
    shutil.copy(tiny_checkpoint, tmp_path / "ck.pt")
    assert to_onnx_main(["ck.pt", "--out", "b", "--data-root", str(tiny_data), "--parity-samples", "8"]) == 0
    assert json.loads((tmp_path / "b" / "parity.json").read_text())["checkpoint"] == str(tmp_path / "ck.pt")
    assert bench_main(["b", "--data-root", str(real_sample), "--iters", "1", "--out", "bench"]) == 0
    timed = json.loads((tmp_path / "bench" / "benchmark.json").read_text())["timed"]
    assert {"pytorch", "onnx-fp32", "auto"} <= set(timed)


@pytest.mark.parametrize("args", [["--iters", "0"], ["-n", "0"]])
def test_benchmark_counts_must_be_positive(args, tiny_bundle, capsys):
    from export.benchmark import main as bench_main
    code, err = _cli(bench_main, [str(tiny_bundle), *args], capsys)
    assert code == 2 and args[0] in err


def test_benchmark_errors_are_one_line(tmp_path, monkeypatch, capsys):
    import export.benchmark as bench
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"PK\x03\x04 not really a checkpoint")
    code, err = _cli(bench.main, [str(bad), "--iters", "1", "--out", str(tmp_path / "o")], capsys)
    assert code == 2 and len(err.strip().splitlines()) == 1 and "bad.pt" in err
    monkeypatch.setattr(bench, "REPO", tmp_path / "installed" / "site-packages")   # no developer checkout
    code, err = _cli(bench.main, ["builtin", "--iters", "1", "--out", str(tmp_path / "o")], capsys)
    assert code != 0 and "--data-root" in err and "Traceback" not in err


# -- 13, 17: a rendered dataset's rerun verifies what it keeps ---------------------------------------
TINY_BLENDER = ["--renderer", "blender", "--size", "64", "43", "--samples", "2", "--questions", "3",
                "--val-images", "1"]
needs_bpy = pytest.mark.skipif(importlib.util.find_spec("bpy") is None,
                               reason="bpy not installed (pip install -e '.[render]')")


@needs_bpy
def test_a_rerun_re_renders_damaged_records_and_pngs_naming_them(tmp_path, capsys):
    from qgmrn.data.generate import main as generate_main
    out = tmp_path / "d"
    args = ["--out", str(out), "--images", "3", *TINY_BLENDER]
    assert generate_main(args) == 0
    scenes = (out / "scenes" / "CLEVR_train_scenes.json").read_bytes()
    capsys.readouterr()
    (out / ".render" / "train" / "000000.json").write_text("{")
    png = out / "images" / "train" / "CLEVR_train_000001.png"
    png.write_bytes(png.read_bytes()[:200])
    rec = out / ".render" / "train" / "000002.json"
    record = json.loads(rec.read_text())
    record["objects"][0]["3d_coords"] = [1e308, 0, 0.35]
    rec.write_text(json.dumps(record))
    assert generate_main(args) == 0
    said = capsys.readouterr().out
    assert "train image 0: its scene record is unreadable" in said and "train image 1: its PNG does not decode" in said
    assert "train image 2: its scene record places an object" in said and "rendering 3 images" in said
    assert (out / "scenes" / "CLEVR_train_scenes.json").read_bytes() == scenes


@needs_bpy
def test_a_rerun_refuses_a_corrupt_settings_file_or_fewer_images(tmp_path, capsys):
    from qgmrn.data.generate import main as generate_main
    out = tmp_path / "d"
    assert generate_main(["--out", str(out), "--images", "3", *TINY_BLENDER]) == 0
    assert generate_main(["--out", str(out), "--images", "2", *TINY_BLENDER]) == 1
    assert "holds 3 rendered train images" in capsys.readouterr().err
    (out / ".render" / "settings.json").write_text("[")
    assert generate_main(["--out", str(out), "--images", "3", *TINY_BLENDER]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "settings.json is unreadable" in err[0]


def test_a_run_without_bpy_leaves_nothing_behind(tmp_path, monkeypatch, capsys):
    from qgmrn.data.generate import main as generate_main
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "bpy" else real_find_spec(name, *a))
    assert generate_main(["--out", str(tmp_path / "d"), "--images", "2", *TINY_BLENDER]) == 1
    assert not (tmp_path / "d" / ".render" / "settings.json").exists()
