"""Export: test-time graph, ONNX with metadata, fp16 routing precision, parity, TensorRT path."""
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from conftest import save_random_checkpoint
from export.bundle import export_checkpoint
from export.onnx_export import NCHWC_GROUP_CHANNELS, build_metadata, merge_conv_groups, read_metadata
from export.parity import TOLERANCES, compare
from export.to_onnx import main as to_onnx_main
from export.to_trt import EXIT_NO_TENSORRT
from export.to_trt import main as to_trt_main
from export.trt import missing_requirements
from qgmrn.checkpoint import load_checkpoint
from qgmrn.data.sources import load_clevr
from qgmrn.model import TextEncoder

PRESETS = ["small", "small-frn", "small+attn"]


@pytest.fixture(scope="module", params=PRESETS)
def exported(request, real_sample, tiny_data, tmp_path_factory):
    """Each small preset exported (fp32 + fp16) with parity on generated and real CLEVR images."""
    d = tmp_path_factory.mktemp(request.param.replace("+", "_"))
    ckpt = save_random_checkpoint(d / "ckpt.pt", request.param, real_sample)
    real = load_clevr(real_sample, "val")
    staged = export_checkpoint(ckpt, d / "bundle", fp16=True, data_root=tiny_data, parity_n=40,
                               extra_samples=real, log=lambda *a: None)
    return ckpt, staged


def _ort(path):
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def test_dims_are_named_and_batches_1_3_8_with_mixed_lengths_match_pytorch(exported):
    ckpt, staged = exported
    sess = _ort(staged.stage / "model.onnx")
    dims = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in onnx.load(str(staged.stage / "model.onnx")).graph.input}
    assert dims["tokens"] == ["batch", "seq_len"] and dims["image"][0] == "batch" and dims["lengths"] == ["batch"]
    model = staged.model
    rng = np.random.default_rng(0)
    for b in (1, 3, 8):
        t = 11
        image = rng.standard_normal((b, 3, model.cfg.image_size, model.cfg.image_size)).astype(np.float32)
        lengths = rng.integers(1, t + 1, b).astype(np.int64)
        lengths[0] = t
        tokens = rng.integers(2, model.cfg.vocab_size, (b, t)).astype(np.int64)
        for i, n in enumerate(lengths):
            tokens[i, n:] = 0
        got = dict(zip(["logits", "gates", "route_logits"], sess.run(None, {"image": image, "tokens": tokens, "lengths": lengths})))
        with torch.no_grad():
            ref = model(torch.from_numpy(image), torch.from_numpy(tokens), torch.from_numpy(lengths))
        ref = {"logits": ref.logits.numpy(), "gates": ref.gates.numpy(), "route_logits": ref.route_logits.numpy()}
        report = compare(ref, got, model.cfg.layer_sizes, TOLERANCES["fp32"])
        assert report["passed"], report["failures"]


def test_parity_report_covers_generated_and_real_images(exported):
    _, staged = exported
    report = staged.report
    assert report["passed"] and report["samples"] == 40 + 100
    fp32 = report["artefacts"]["onnx-fp32"]
    assert fp32["max_abs_logit_diff"] <= 1e-4 and fp32["top1_agreement"] == 1.0
    assert fp32["gates_differ_outside_eps"] == 0
    assert 0.05 < np.mean(staged.reference["gates"]) < 0.95, "the routing must really vary in this test"


def test_metadata_round_trip(exported, real_sample):
    ckpt, staged = exported
    meta = read_metadata(staged.stage / "model.onnx")
    state = load_checkpoint(ckpt)
    added = ("merged_conv_groups", "execution")                                  # added by the export
    written = {k: v for k, v in meta.items() if k not in added}
    assert meta["execution"] == "masked"                                        # the default export
    assert written == json.loads(json.dumps(build_metadata(state, meta["checkpoint_sha256"], "fp32")))
    assert meta["vocab"] == state["vocab"] and meta["answers"] == state["answers"]
    assert meta["layer_sizes"] == list(staged.model.cfg.layer_sizes) and meta["opset"] == 18
    runtime_view = json.loads(_ort(staged.stage / "model.onnx").get_modelmeta().custom_metadata_map["qgmrn"])
    assert runtime_view == meta
    assert not list(staged.stage.glob("*.data")), "one self-contained file"


def test_gru_is_exported_with_linear_before_reset(exported):
    _, staged = exported
    grus = [n for n in onnx.load(str(staged.stage / "model.onnx")).graph.node if n.op_type == "GRU"]
    assert len(grus) == 1
    attrs = {a.name: a.i for a in grus[0].attribute if a.type == onnx.AttributeProto.INT}
    assert attrs["linear_before_reset"] == 1


def test_groupnorm_is_decomposed_for_tensorrt(exported):
    _, staged = exported
    ops = {n.op_type for n in onnx.load(str(staged.stage / "model.onnx")).graph.node}
    assert "GroupNormalization" not in ops


def test_fp32_graph_has_only_cpu_friendly_conv_groups(exported):
    """Grouped convs are stored with >= 16 channels per group (block-diagonal weights) so that
    onnxruntime runs them with its NCHWc kernels; the parity tests above cover the values."""
    _, staged = exported
    proto = onnx.load(str(staged.stage / "model.onnx"))
    inits = {t.name: t for t in proto.graph.initializer}
    grouped = 0
    for node in proto.graph.node:
        group = next((a.i for a in node.attribute if a.name == "group"), 1)
        if node.op_type == "Conv" and group > 1:
            cout, kin = inits[node.input[1]].dims[:2]
            assert kin % NCHWC_GROUP_CHANNELS == 0 and (cout // group) % NCHWC_GROUP_CHANNELS == 0
            grouped += 1
    meta = read_metadata(proto)
    assert grouped == (meta["num_layers"] if meta["arch"] == "brn" else 0)
    # small: branch widths 4, 8, 16, 16 channels -> the first two blocks were merged
    assert meta["merged_conv_groups"] == (2 if meta["arch"] == "brn" else 0)


# (groups, channels, groups after merging): 2, 4, 12 channels per group merge into 16, 16, 48;
# 16 stays; 6 channels x 6 groups cannot reach a multiple of 16 and stays as it is.
@pytest.mark.parametrize("groups,channels,merged", [(32, 64, 4), (32, 128, 8), (8, 96, 2), (4, 64, 4), (6, 36, 6)])
def test_merged_conv_groups_compute_the_same_conv(tmp_path, groups, channels, merged):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(channels, channels, 3, 2, 1, groups=groups, bias=False).eval()
    x = torch.randn(2, channels, 9, 9)
    torch.onnx.export(conv, (x,), str(tmp_path / "c.onnx"), dynamo=False, opset_version=18,
                      input_names=["x"], output_names=["y"])
    proto = onnx.load(str(tmp_path / "c.onnx"))
    assert merge_conv_groups(proto) == int(merged != groups)
    onnx.checker.check_model(proto)
    assert next(a.i for a in proto.graph.node[0].attribute if a.name == "group") == merged
    got = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x.numpy()})[0]
    np.testing.assert_allclose(got, conv(x).detach().numpy(), atol=1e-5)


def test_fp16_graph_keeps_routing_float32_and_gates_equal(exported):
    _, staged = exported
    r16 = staged.report["artefacts"]["onnx-fp16"]
    precision = r16["routing_precision"]
    assert precision["routing_nodes"] > 5 and set(precision["float_tensor_types"]) == {"FLOAT"}
    assert r16["gates_differ_outside_eps"] == 0 and r16["passed"]
    types = {i.data_type for i in onnx.load(str(staged.stage / "model.fp16.onnx")).graph.initializer}
    assert onnx.TensorProto.FLOAT16 in types


def test_exported_gru_computes_torchs_gru(tmp_path):
    torch.manual_seed(0)
    enc = TextEncoder(30, 12, 24).eval()
    tokens = torch.tensor([[3, 4, 5, 6, 7], [8, 9, 0, 0, 0]])
    lengths = torch.tensor([5, 2])
    torch.onnx.export(enc, (tokens, lengths), str(tmp_path / "gru.onnx"), dynamo=False, opset_version=18,
                      input_names=["tokens", "lengths"], dynamic_axes={"tokens": {0: "b", 1: "t"}, "lengths": {0: "b"}})
    gru = next(n for n in onnx.load(str(tmp_path / "gru.onnx")).graph.node if n.op_type == "GRU")
    assert {a.name: a.i for a in gru.attribute}["linear_before_reset"] == 1
    got = _ort(tmp_path / "gru.onnx").run(None, {"tokens": tokens.numpy(), "lengths": lengths.numpy()})[0]
    np.testing.assert_allclose(got, enc(tokens, lengths).detach().numpy(), atol=1e-5)


def test_to_onnx_cli_publishes_a_bundle(tmp_path, tiny_data):
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    assert to_onnx_main([str(ckpt), "--data-root", str(tiny_data), "--parity-samples", "20"]) == 0
    bundle = tmp_path / "ckpt-export"
    assert sorted(p.name for p in bundle.iterdir()) == ["model.onnx", "parity.json"]
    assert json.loads((bundle / "parity.json").read_text())["passed"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "no staging leftovers"


@pytest.mark.skipif(not missing_requirements(), reason="TensorRT and a GPU are present: the engine path runs")
def test_to_trt_without_tensorrt_writes_verified_onnx_and_says_what_is_missing(tmp_path, tiny_data, capsys):
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    code = to_trt_main([str(ckpt), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                        "--parity-samples", "20"])
    assert code == EXIT_NO_TENSORRT
    err = capsys.readouterr().err
    assert "built no TensorRT engine" in err and ("TensorRT is not installed" in err or "no CUDA GPU" in err)
    assert (tmp_path / "b" / "model.onnx").exists() and json.loads((tmp_path / "b" / "parity.json").read_text())["passed"]


def test_bad_inputs_fail_clearly_and_leave_nothing(tmp_path, tiny_data, capsys):
    assert to_onnx_main([str(tmp_path / "missing.pt")]) == 2
    assert "checkpoint not found" in capsys.readouterr().err
    (tmp_path / "text.pt").write_text("hello")
    assert to_onnx_main([str(tmp_path / "text.pt")]) == 2
    assert "not a readable checkpoint" in capsys.readouterr().err
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    state = torch.load(ckpt, weights_only=True)
    state["model_config"]["arch"] = "transformer"
    torch.save(state, tmp_path / "other_arch.pt")
    assert to_onnx_main([str(tmp_path / "other_arch.pt")]) == 2
    assert "model config does not fit" in capsys.readouterr().err
    state["format_version"] = 99
    torch.save(state, tmp_path / "future.pt")
    assert to_onnx_main([str(tmp_path / "future.pt")]) == 2
    assert "format version 99" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")
    assert to_onnx_main([str(ckpt), "--out", str(tmp_path / "a_file" / "bundle")]) == 2
    assert "cannot write" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file", "ckpt.pt", "future.pt", "other_arch.pt", "text.pt"]


def test_parity_out_of_tolerance_fails_and_publishes_nothing(tmp_path, tiny_data, monkeypatch, capsys):
    from export import parity
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "tiny")
    monkeypatch.setitem(parity.TOLERANCES, "fp32", parity.TOLERANCES["fp32"].__class__(0.0, 1.0))
    assert to_onnx_main([str(ckpt), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data),
                         "--parity-samples", "20"]) == 1
    err = capsys.readouterr().err
    assert "parity check failed" in err and "exceeds 0" in err
    assert not (tmp_path / "b").exists() and (tmp_path / "b.failed" / "parity.json").exists()


@pytest.mark.gpu
def test_tensorrt_engine_parity(tmp_path, tiny_data):
    pytest.importorskip("tensorrt", reason="TensorRT is not installed")
    ckpt = save_random_checkpoint(tmp_path / "ckpt.pt", "small")
    assert to_trt_main([str(ckpt), "--out", str(tmp_path / "b"), "--data-root", str(tiny_data), "--fp16",
                        "--parity-samples", "40"]) == 0
    report = json.loads((tmp_path / "b" / "parity.json").read_text())
    assert report["artefacts"]["trt-fp32"]["passed"] and report["artefacts"]["trt-fp16"]["passed"]
    info = json.loads((tmp_path / "b" / "model.engine.json").read_text())
    assert {"tensorrt_version", "gpu_name", "compute_capability", "onnx_sha256"} <= set(info)
