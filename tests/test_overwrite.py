"""--overwrite replaces a run only once the new run is sure to start: a mistake in the new command
(missing data, contradictory settings, a batch larger than the data) is one line and exit 2, and the
old run (checkpoint, metrics, evaluation, config, its export) is all still there."""
import pytest

import qgmrn.train as train_mod
from conftest import tiny_train_config
from qgmrn.train import train

RUN_FILES = ("ckpt.pt", "metrics.jsonl", "eval.json", "config.json", "model.onnx", "parity.json")


@pytest.fixture
def finished_run(tiny_data, tmp_path):
    out = tmp_path / "run"
    train(tiny_train_config(tiny_data, out, steps=2), log=lambda *a, **k: None)
    (out / "model.onnx").write_bytes(b"an export of this run")            # as export writes into a run
    (out / "parity.json").write_text("{}")
    return out, {name: (out / name).read_bytes() for name in RUN_FILES}


@pytest.mark.parametrize("mistake, message", [
    (lambda d, t: ["--data-root", str(t / "nowhere")], "not found"),
    (lambda d, t: ["--data-root", str(d), "--set", "count_weight=1", "--set", "pool=max"], "count"),
    (lambda d, t: ["--data-root", str(d), "--batch-size", "100000"], "batch"),
    (lambda d, t: ["--jsonl", str(t / "train.jsonl"), str(t / "val.jsonl")], "not found"),
])
def test_overwrite_with_a_mistake_keeps_the_old_run(finished_run, tiny_data, tmp_path, capsys, mistake, message):
    out, before = finished_run
    args = mistake(tiny_data, tmp_path) + ["--preset", "tiny", "--steps", "2", "--out", str(out), "--overwrite"]
    try:
        code = train_mod.main(args)
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    assert code == 2 and message in err.lower() and "Traceback" not in err
    assert {name: (out / name).read_bytes() for name in RUN_FILES} == before


def test_overwrite_that_starts_replaces_the_run_and_its_export(finished_run, tiny_data, capsys):
    out, before = finished_run
    code = train_mod.main(["--data-root", str(tiny_data), "--preset", "tiny", "--steps", "3", "--batch-size", "8",
                           "--out", str(out), "--overwrite"])
    assert code == 0 and (out / "ckpt.pt").read_bytes() != before["ckpt.pt"]
    assert not (out / "model.onnx").exists() and not (out / "parity.json").exists()
