"""Runtime backends: OpenVINO with float32 routing, and auto's ordered fallback."""
import logging
import shutil

import numpy as np
import pytest

import runtime
from qgmrn.data.sources import load_clevr


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def _feeds(model, samples):
    from qgmrn.preprocess import encode_batch, preprocess_image
    tokens, lengths, _ = encode_batch(model.vocab, [s.question for s in samples])
    images = np.stack([preprocess_image(s.image, model.image_size) for s in samples])
    return {"image": images, "tokens": tokens, "lengths": lengths}


def test_openvino_keeps_routing_float32_and_answers_like_onnxruntime(bundle, tiny_data, real_sample):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install -e '.[openvino]')")
    ov = runtime.load(bundle, backend="openvino")
    ref = runtime.load(bundle, backend="cpu")
    assert ov.backend.startswith("OpenVINO") and "routing f32" in ov.backend
    samples = load_clevr(real_sample, "val") + load_clevr(tiny_data, "val")
    feeds = _feeds(ref, samples)
    a, b = ov._runner.run(feeds), ref._runner.run(feeds)
    np.testing.assert_allclose(a["route_logits"], b["route_logits"], rtol=0, atol=1e-5)   # float32 path
    assert (a["gates"] == b["gates"]).all()
    assert np.abs(a["logits"] - b["logits"]).max() < 5e-2                               # bf16 visual path
    agree = np.mean(a["logits"].argmax(1) == b["logits"].argmax(1))
    assert agree >= 0.99


def test_export_parity_has_an_openvino_row_when_installed(bundle):
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    import json
    report = json.loads((bundle / "parity.json").read_text())
    rows = [k for k in report["artefacts"] if k.startswith("openvino-")]
    assert rows and all(report["artefacts"][k]["advisory"] for k in rows)   # they decide auto, not publishing
    assert all(report["artefacts"][k]["gates_differ_outside_eps"] == 0 for k in rows)
    assert all(report["artefacts"][k]["latency_ms"]["1"] > 0 for k in rows)


@pytest.fixture()
def int8_bundle(tiny_checkpoint, tiny_data, tmp_path_factory):
    """A bundle with every row (fp16, int8, OpenVINO), exported once per test that alters it."""
    from export.bundle import export_checkpoint, publish
    out = tmp_path_factory.mktemp("int8") / "bundle"
    staged = export_checkpoint(tiny_checkpoint, out, fp16=True, int8=True, calib=16, data_root=tiny_data,
                               parity_n=24, log=lambda *a: None)
    publish(staged.stage, out)
    return out


def _rows(bundle, change):
    import json
    report = json.loads((bundle / "parity.json").read_text())
    for key, row in report["artefacts"].items():
        change(key, row)
    (bundle / "parity.json").write_text(json.dumps(report))


def test_auto_runs_the_fastest_row_that_passed_on_enough_questions(int8_bundle, caplog):
    def fast(key, row, favourite="onnx-int8"):
        row["samples"] = 400                                   # as if judged on 400 questions
        row["latency_ms"] = {"1": 0.5 if key == favourite else 5.0, "8": 1.0}
    # judged on 24 questions only: a reduced precision is never auto's choice
    assert runtime.load(int8_bundle).backend.startswith("onnxruntime") and \
        runtime.load(int8_bundle).path.name == "model.onnx"
    _rows(int8_bundle, fast)
    with caplog.at_level(logging.INFO, logger="runtime"):
        model = runtime.load(int8_bundle)
    assert model.path.name == "model.int8.onnx" and "[onnx-int8]" in model.backend
    assert "onnx-int8: passed parity on 400 questions" in model.backend_reason and "onnx-int8" in caplog.text
    # a failed row is never chosen, whatever its speed
    _rows(int8_bundle, lambda key, row: row.update(passed=False) if key == "onnx-int8" else None)
    assert "[onnx-int8]" not in runtime.load(int8_bundle).backend


def test_auto_refuses_an_altered_reduced_precision_file_and_falls_back(int8_bundle, caplog):
    _rows(int8_bundle, lambda key, row: row.update(samples=400, latency_ms={"1": 0.1 if key == "onnx-int8" else 9,
                                                                             "8": 1}))
    with open(int8_bundle / "model.int8.onnx", "ab") as f:
        f.write(b"\0")
    with caplog.at_level(logging.WARNING, logger="runtime"):
        model = runtime.load(int8_bundle)
    assert model.path.name != "model.int8.onnx" and "sha256 differs" in caplog.text


def test_auto_falls_back_when_the_preferred_backend_cannot_run(int8_bundle, monkeypatch, caplog):
    pytest.importorskip("openvino", reason="OpenVINO is not installed")
    def broken(path, precision="auto", check_weights=True):
        raise runtime.ModelError("simulated: OpenVINO cannot compile this model")
    import runtime.openvino_backend as ovb
    _rows(int8_bundle, lambda key, row: row.update(samples=400, passed=True,
                                                   latency_ms={"1": 0.1 if key.startswith("openvino") else 9, "8": 1}))
    monkeypatch.setattr(ovb, "OpenVINORunner", broken)
    with caplog.at_level(logging.WARNING, logger="runtime"):
        model = runtime.load(int8_bundle)
    assert not model.backend.startswith("OpenVINO")
    assert "simulated" in caplog.text
    assert model._runner.fallbacks and "simulated" in model._runner.fallbacks[0]
    with pytest.raises(runtime.ModelError, match="simulated"):
        runtime.load(int8_bundle, backend="openvino")                 # an explicit backend raises


def test_on_another_cpu_auto_ranks_rows_by_the_hardware_it_has():
    from runtime.precision import rank
    import tempfile
    from pathlib import Path
    folder = Path(tempfile.mkdtemp())
    for name in ("model.onnx", "model.int8.onnx"):
        (folder / name).write_bytes(b"x")
    rows = {k: {"passed": True, "engine": "onnxruntime", "precision": p, "file": f, "samples": 400,
                "cpu": {"model": "some other CPU", "cores": 64}, "latency_ms": {"1": t}}
            for k, p, f, t in (("onnx-fp32", "fp32", "model.onnx", 1.0), ("onnx-int8", "int8", "model.int8.onnx", 9.0))}
    here = {"model": "this CPU", "cores": 2, "bf16": False, "vnni": True, "amx": False}
    choices, _ = rank(rows, folder, here)
    assert [c.key for c in choices] == ["onnx-int8", "onnx-fp32"] and "features" in choices[0].reason
    choices, skipped = rank(rows, folder, {**here, "vnni": False})
    assert [c.key for c in choices] == ["onnx-fp32"] and any("VNNI" in s for s in skipped)


def test_an_engine_that_cannot_run_here_falls_back_to_the_onnx(bundle, tmp_path, monkeypatch):
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    (copy / "model.engine").write_bytes(b"not an engine for this machine")
    model = runtime.load(copy)
    assert model.backend.startswith(("onnxruntime", "OpenVINO")) and model._runner.fallbacks
    assert "TensorRT" in model._runner.fallbacks[0]
    with pytest.raises(runtime.ModelError):
        runtime.load(copy, backend="tensorrt")


def test_tensorrt_runner_slices_big_batches_and_refuses_long_questions():
    from runtime.trt_engine import check_question_length, split_feeds
    feeds = {"image": np.zeros((10, 3, 2, 2), np.float32), "tokens": np.ones((10, 7), np.int64),
             "lengths": np.full(10, 7, np.int64)}
    parts = split_feeds(feeds, 4)
    assert [len(p["image"]) for p in parts] == [4, 4, 2] and all(len(p["tokens"]) == len(p["image"]) for p in parts)
    check_question_length(feeds, 7)
    with pytest.raises(runtime.QuestionError, match="longer than this engine's profile"):
        check_question_length(feeds, 6)


def test_a_failed_engine_build_leaves_nothing_and_says_one_line(tiny_checkpoint, tiny_data, tmp_path, monkeypatch,
                                                                capsys):
    import export.to_trt as to_trt
    import runtime.trt_engine as trt_engine
    monkeypatch.setattr(to_trt, "missing_requirements", lambda: [])
    monkeypatch.setattr(trt_engine, "trt_major", lambda: 10)
    built_from = []

    def failing_build(onnx_path, engine_path, opts, log=print):
        import onnx
        graph = onnx.load(str(onnx_path)).graph
        groups = [a.i for n in graph.node if n.op_type == "Conv" for a in n.attribute if a.name == "group"]
        built_from.append((onnx_path, groups))
        raise RuntimeError("simulated parser failure")
    monkeypatch.setattr(to_trt, "build_engine", failing_build)
    code = to_trt.main([str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                        "--parity-samples", "8"])
    err = capsys.readouterr().err
    assert code == 1 and "TensorRT could not build model.engine: simulated parser failure" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == []                  # no bundle, no staging dir
    path, groups = built_from[0]
    assert not path.exists()                                                 # a temporary graph, removed
    assert 4 in groups              # the paper's groups (tiny: cardinality 4), not merged for CPU kernels
