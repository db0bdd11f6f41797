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
