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
@pytest.mark.skipif(importlib.util.find_spec("bpy") is None, reason="bpy not installed (pip install 'qgmrn[render]')")
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
