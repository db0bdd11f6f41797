"""Reduced precisions judged by their answers (issue 20): the parity rule, int8 export, a failed
reduced artefact left out, batch preprocessing equal to training's, and the benchmark table."""
import json

import numpy as np
import onnx
import pytest

import runtime
from export.parity import ANSWERS_RULE, TOLERANCES, compare


def _outputs(n=400, answers=10, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(n, answers)).astype(np.float32)
    logits[np.arange(n), rng.integers(0, answers, n)] += 5.0            # clear winners
    route = rng.normal(size=(n, 2, 4)).astype(np.float32)
    return {"logits": logits, "route_logits": route, "gates": (route > 0).astype(np.float32)}


def test_a_reduced_precision_passes_on_its_answers_not_its_logits():
    ref = _outputs()
    labels = ref["logits"].argmax(1)
    moved = {**ref, "logits": ref["logits"] + 0.6}                       # every logit moved, answers kept
    r = compare(ref, moved, [4, 4], ANSWERS_RULE, labels=labels)
    assert r["passed"] and r["max_abs_logit_diff"] == pytest.approx(0.6, abs=1e-5)   # reported, not gated
    assert r["accuracy"] == r["accuracy_reference"] == 1.0
    assert not compare(ref, moved, [4, 4], TOLERANCES["fp32"], labels=labels)["passed"]   # fp32 keeps 1e-4


def test_answers_rule_fails_on_lost_accuracy_flipped_answers_or_gates():
    ref = _outputs()
    labels = ref["logits"].argmax(1)
    wrong = ref["logits"].copy()
    wrong[:3] = -wrong[:3]                                               # 3 of 400 answers change: top-1 99.25%
    r = compare(ref, {**ref, "logits": wrong}, [4, 4], ANSWERS_RULE, labels=labels)
    assert not r["passed"] and "0.75 points below" in " ".join(r["failures"])        # accuracy -0.75 pt
    assert r["top1_agreement"] == pytest.approx(0.9925)
    lost = ref["logits"].copy()
    lost[:5] = -lost[:5]
    assert any("top-1" in f for f in compare(ref, {**ref, "logits": lost}, [4, 4], ANSWERS_RULE)["failures"])
    gates = ref["gates"].copy()
    far = np.argwhere(np.abs(ref["route_logits"]) > 0.5)[0]
    gates[tuple(far)] = 1 - gates[tuple(far)]
    r = compare(ref, {**ref, "gates": gates}, [4, 4], ANSWERS_RULE, labels=labels)
    assert not r["passed"] and r["gates_differ_outside_eps"] == 1


@pytest.fixture(scope="module")
def int8_export(tiny_checkpoint, tiny_data, tmp_path_factory):
    from export.to_onnx import main as to_onnx_main
    out = tmp_path_factory.mktemp("int8-cli") / "bundle"
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(out), "--data-root", str(tiny_data), "--int8",
                         "--calib", "16", "--parity-samples", "24"]) == 0
    return out


def test_int8_export_quantizes_only_the_visual_convolutions(int8_export):
    proto = onnx.load(str(int8_export / "model.int8.onnx"))
    quantized = {n.output[0] for n in proto.graph.node if n.op_type == "DequantizeLinear"}
    convs = [n for n in proto.graph.node if n.op_type == "Conv"]
    assert convs and all(n.input[0] in quantized for n in convs)        # every conv reads int8 activations
    for n in proto.graph.node:                                           # routing reads no quantized tensor
        if n.name.startswith("routing/"):
            assert not set(n.input) & quantized, n.name
    report = json.loads((int8_export / "parity.json").read_text())
    row = report["artefacts"]["onnx-int8"]
    assert row["precision"] == "int8" and row["gates_differ_outside_eps"] == 0 and "accuracy" in row
    assert report["int8"]["calibration_samples"] == 16 and "train" in report["int8"]["calibration_source"]
    model = runtime.load(int8_export / "model.int8.onnx", backend="cpu")
    assert model.metadata["precision"] == "int8"


def test_a_reduced_file_no_backend_passed_is_left_out_and_the_bundle_still_publishes(
        tiny_checkpoint, tiny_data, tmp_path, monkeypatch, capsys):
    from export import parity
    from export.to_onnx import main as to_onnx_main
    monkeypatch.setitem(parity.TOLERANCES, "int8", parity.Tolerance(None, 1.01))     # nothing can pass
    assert to_onnx_main([str(tiny_checkpoint), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                         "--int8", "--calib", "8", "--parity-samples", "16"]) == 0
    out = capsys.readouterr().out
    assert "model.int8.onnx left out" in out and "onnx-int8 failed" in out
    assert not (tmp_path / "b" / "model.int8.onnx").exists() and (tmp_path / "b" / "model.onnx").exists()
    row = json.loads((tmp_path / "b" / "parity.json").read_text())["artefacts"]["onnx-int8"]
    assert row["passed"] is False and row["published"] is False and row["failures"]
    assert runtime.load(tmp_path / "b").path.name == "model.onnx"


def test_batch_preprocessing_on_threads_equals_trainings_and_names_a_bad_image(real_sample):
    from qgmrn.preprocess import preprocess_image
    model = runtime.load("builtin", backend="cpu")
    images = sorted((real_sample / "images" / "val").glob("*.png"))[:8]
    expect = np.stack([preprocess_image(p, model.image_size) for p in images])
    assert np.array_equal(model._pixels(images), expect)
    with pytest.raises(runtime.ImageError, match="not found"):
        model.predict_batch([images[0], "no/such.png"], ["What color is it?"] * 2)


def test_benchmark_times_every_row_and_writes_the_table(int8_export, tiny_data, tmp_path):
    from export.benchmark import main as bench_main
    assert bench_main([str(int8_export), "--data-root", str(tiny_data), "--iters", "1",
                       "--out", str(tmp_path / "bench")]) == 0
    md = (tmp_path / "bench" / "benchmark.md").read_text()
    data = json.loads((tmp_path / "bench" / "benchmark.json").read_text())
    assert {"onnx-fp32", "onnx-int8", "auto"} <= set(data["timed"])
    assert "pytorch" in data["timed"] and data["base"] == "pytorch"       # the bundle names its checkpoint
    assert all(not t["torch_imported"] for k, t in data["timed"].items() if k != "pytorch")
    for key in data["timed"]:
        assert f"| {key} |" in md


def test_the_builtin_model_runs_its_fastest_passing_row_and_answers_as_fp32(real_sample):
    from qgmrn.data.sources import load_clevr
    from runtime.precision import MIN_JUDGED, rank, report_rows
    card = json.loads((runtime.builtin_path().with_suffix(".json")).read_text())
    rows = card["artefacts"]
    assert rows["onnx-fp32"]["passed"] and all(r["samples"] >= MIN_JUDGED for r in rows.values())
    for key, row in rows.items():                    # each row's verdict follows the rule it was judged by
        if row["precision"] != "fp32":
            assert row["passed"] == (row["gates_differ_outside_eps"] == 0 and row["top1_agreement_clean"] >= 0.99
                                     and row["accuracy_drop"] <= 0.005 + 1e-12), key
    model = runtime.load("builtin")
    choices, _ = rank(*report_rows(runtime.builtin_path()))
    assert model.path == choices[0].path or model._runner.fallbacks
    fp32 = runtime.load("builtin", backend="cpu")
    samples = load_clevr(real_sample, "train") + load_clevr(real_sample, "val")
    images, questions = [s.image for s in samples], [s.question for s in samples]
    same = np.mean([a == b for a, b in zip(model.answer_batch(images, questions), fp32.answer_batch(images, questions))])
    assert same >= 0.99, f"auto ({model.backend}) agrees with fp32 on {100 * same:.1f}% of the real sample"
