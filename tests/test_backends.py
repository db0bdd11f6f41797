"""Runtime backends: OpenVINO with float32 routing, and auto's ordered fallback."""
import logging
import shutil

import numpy as np
import pytest

import runtime
from qgmrn.data.sources import load_clevr
from runtime import backends


@pytest.fixture(scope="module")
def bundle(tiny_bundle):
    return tiny_bundle


def _feeds(model, samples):
    from qgmrn.preprocess import encode_batch, preprocess_image
    tokens, lengths, _ = encode_batch(model.vocab, [s.question for s in samples])
    images = np.stack([preprocess_image(s.image, model.image_size) for s in samples])
    return {"image": images, "tokens": tokens, "lengths": lengths}


def test_openvino_keeps_routing_float32_and_answers_like_onnxruntime(bundle, tiny_data, real_sample):
    pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'qgmrn[openvino]')")
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
    assert rows and report["artefacts"][rows[0]]["advisory"]           # reported, not deciding publishing
    assert report["artefacts"][rows[0]]["gates_differ_outside_eps"] == 0


def test_auto_falls_back_when_the_preferred_backend_cannot_run(bundle, monkeypatch, caplog):
    def broken(path, precision="auto"):
        raise runtime.ModelError("simulated: OpenVINO cannot compile this model")
    import runtime.openvino_backend as ovb
    monkeypatch.setattr(backends, "openvino_preferred", lambda: (True, "test"))
    monkeypatch.setattr(ovb, "OpenVINORunner", broken)
    with caplog.at_level(logging.WARNING, logger="runtime"):
        model = runtime.load(bundle)
    assert model.backend.startswith("onnxruntime")
    assert "OpenVINO" in caplog.text and "simulated" in caplog.text
    assert model._runner.fallbacks and "simulated" in model._runner.fallbacks[0]
    with pytest.raises(runtime.ModelError, match="simulated"):
        runtime.load(bundle, backend="openvino")                 # an explicit backend raises


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
