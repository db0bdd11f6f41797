"""Compact routed execution (issue 40): the graph that skips switched-off modules answers as the
masked graph does, with identical gates, at batch 1 (its batch-1 form) and batch 8 (the union of
the batch's modules), on BRN and FRN, with a layer all off and a layer all on."""
import numpy as np
import pytest
import torch

from export.compact import CompactTestTimeModel
from export.graph import TestTimeModel
from export.onnx_export import export_onnx, read_metadata

ort = pytest.importorskip("onnxruntime")


def routed_model(preset: str, seed: int = 0):
    """Random weights and BatchNorm statistics; routing that differs between questions, layer 0
    switched off for every question and layer 1 on for every question."""
    from qgmrn.model import create_model
    torch.manual_seed(seed)
    model = create_model(preset, vocab_size=60, num_answers=12)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.normal_(0, 0.2)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.normal_(1, 0.2)
                m.bias.normal_(0, 0.2)
        fc = model.router.fc
        fc.weight.normal_(0, 0.5)
        fc.bias.zero_()
        sizes = model.cfg.layer_sizes
        fc.weight[:sizes[0]] = 0
        fc.bias[:sizes[0]] = -4.0                                  # layer 0: all off
        fc.weight[sizes[0]:sizes[0] + sizes[1]] = 0
        fc.bias[sizes[0]:sizes[0] + sizes[1]] = 4.0                # layer 1: all on
    return model.eval()


def inputs(model, batch: int, seed: int = 1):
    rng = np.random.default_rng(seed)
    size = model.cfg.image_size
    lengths = rng.integers(3, 10, batch)
    tokens = rng.integers(2, 60, (batch, 10))
    for i, n in enumerate(lengths):
        tokens[i, n:] = 0
    return {"image": rng.standard_normal((batch, 3, size, size), dtype=np.float32),
            "tokens": tokens.astype(np.int64), "lengths": lengths.astype(np.int64)}


@pytest.mark.parametrize("preset", ["tiny", "tiny-frn"])
def test_compact_graphs_answer_as_the_masked_graph(preset, tmp_path):
    model = routed_model(preset)
    masked = export_onnx(model, tmp_path / "masked.onnx", {})
    general = export_onnx(model, tmp_path / "compact.onnx", {}, compact=True)
    single = export_onnx(model, tmp_path / "compact1.onnx", {}, compact=True, batch1=True)
    assert read_metadata(general)["execution"] == "compact" and read_metadata(single)["execution"] == "compact-batch1"
    run = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"])
           for k, p in (("masked", masked), ("general", general), ("single", single))}
    for batch, graph in ((1, "single"), (1, "general"), (8, "general")):
        feeds = inputs(model, batch)
        want = run["masked"].run(None, feeds)
        got = run[graph].run(None, feeds)
        gates = want[1]
        assert not gates[:, 0].any() and gates[:, 1, :model.cfg.layer_sizes[1]].all()
        if batch == 8:                                   # questions differ in the other layers
            assert any(not np.array_equal(gates[0, l], gates[i, l]) for i in range(8)
                       for l in range(2, model.cfg.num_layers)) or model.cfg.num_layers == 2
        np.testing.assert_array_equal(got[1], gates)
        np.testing.assert_array_equal(got[0].argmax(1), want[0].argmax(1))
        np.testing.assert_allclose(got[0], want[0], atol=1e-4, rtol=1e-4)
    # the single-question graph, question by question, is the batch's answers
    feeds = inputs(model, 8)
    want = run["masked"].run(None, feeds)[0]
    for i in range(8):
        one = {k: v[i:i + 1] for k, v in feeds.items()}
        np.testing.assert_allclose(run["single"].run(None, one)[0][0], want[i], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("preset", ["tiny", "small-frn"])
def test_compact_module_matches_the_masked_module_with_every_gate_pattern(preset):
    model = routed_model(preset)
    feeds = inputs(model, 4)
    args = (torch.from_numpy(feeds["image"]), torch.from_numpy(feeds["tokens"]), torch.from_numpy(feeds["lengths"]))
    with torch.no_grad():
        want = TestTimeModel(model)(*args)
        got = CompactTestTimeModel(model)(*args)
        assert torch.equal(got[1], want[1])
        assert torch.allclose(got[0], want[0], atol=1e-5)
        for i in range(4):
            one = CompactTestTimeModel(model, batch1=True)(*(a[i:i + 1] for a in args))
            assert torch.allclose(one[0][0], want[0][i], atol=1e-5)


def test_the_runtime_says_which_execution_ran_and_the_demo_what_it_saved(tiny_checkpoint, real_sample, tmp_path):
    """Issue 40 part 3: predict() names the execution path (masked / compact) of the graph that
    answered; a compact export answers through the runtime as the masked one does."""
    import runtime
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    from export.onnx_export import build_metadata
    from runtime.demo import skipped_line
    state = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(state).eval()
    meta = build_metadata(state, "0" * 64, "fp32")
    files = {"masked": export_onnx(model, tmp_path / "masked.onnx", meta),
             "compact": export_onnx(model, tmp_path / "compact.onnx", meta, compact=True)}
    loaded = {k: runtime.Model(p, backend="onnxruntime") for k, p in files.items()}
    images = sorted((real_sample / "images" / "val").glob("*.png"))[:3]
    questions = ["How many cubes are there?", "Is there a red sphere?", "What size is the cylinder?"]
    preds = {k: m.predict_batch([str(p) for p in images], questions) for k, m in loaded.items()}
    for masked, compact in zip(preds["masked"], preds["compact"]):
        assert (masked.execution, compact.execution) == ("masked", "compact")
        assert masked.answer == compact.answer and masked.gates == compact.gates
        assert masked.to_dict()["routing"]["execution"] == "masked"
    pred, modules = preds["masked"][0], sum(loaded["masked"].layer_sizes)
    off = modules - sum(map(sum, pred.gates))
    assert f"switched off {off} of {modules} modules" in skipped_line(pred, modules)
    assert "no time is saved" in skipped_line(pred, modules)
    assert "skips them (compact execution)" in skipped_line(preds["compact"][0], modules)


def test_an_execution_the_runtime_does_not_know_is_refused(tiny_bundle, tmp_path):
    import runtime
    from conftest import with_metadata
    bad = with_metadata(tiny_bundle / "model.onnx", tmp_path / "bad.onnx", lambda m: m.update(execution="sparse-v9"))
    with pytest.raises(runtime.ModelError, match="execution 'sparse-v9'"):
        runtime.Model(bad, backend="onnxruntime")
    legacy = with_metadata(tiny_bundle / "model.onnx", tmp_path / "old.onnx", lambda m: m.pop("execution", None))
    assert runtime.Model(legacy, backend="onnxruntime").execution == "masked"     # exports made before it


def test_a_batch1_compact_export_answers_batches_one_question_at_a_time(tiny_checkpoint, real_sample, tmp_path):
    """Trust round 5, M1: a compact-batch1 graph was handed whole batches and failed every batch of
    more than one (onnxruntime's InvalidArgument, a 500 from the server). The runtime runs it one
    question at a time, with the answers and gates of the masked graph."""
    import runtime
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    from export.onnx_export import build_metadata
    state = load_checkpoint(tiny_checkpoint)
    model = model_from_checkpoint(state).eval()
    meta = build_metadata(state, "0" * 64, "fp32")
    masked = runtime.Model(export_onnx(model, tmp_path / "masked.onnx", meta), backend="onnxruntime")
    single = runtime.Model(export_onnx(model, tmp_path / "c1.onnx", meta, compact=True, batch1=True),
                           backend="onnxruntime")
    images = [str(p) for p in sorted((real_sample / "images" / "val").glob("*.png"))[:4]]
    questions = ["How many cubes are there?", "Is there a red sphere?", "What size is the cylinder?",
                 "Are there more large things than small rubber balls?"]
    for batch_size in (4, 3):
        got = single.predict_batch(images, questions, batch_size=batch_size)
        want = masked.predict_batch(images, questions)
        assert [p.execution for p in got] == ["compact-batch1"] * 4
        assert [(p.answer, p.gates) for p in got] == [(p.answer, p.gates) for p in want]
        assert np.allclose([p.probability for p in got], [p.probability for p in want], atol=1e-5)
