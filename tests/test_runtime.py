"""Runtime: torch-free answers equal to PyTorch's, every image form, bad input, threads, CLI."""
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

import runtime
from conftest import REPO
from export.bundle import export_checkpoint, publish
from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
from qgmrn.data.sources import load_clevr
from qgmrn.preprocess import Vocab, encode_batch, preprocess_image


@pytest.fixture(scope="module")
def bundle(tiny_checkpoint, tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("rt") / "bundle"
    staged = export_checkpoint(tiny_checkpoint, out, data_root=tiny_data, parity_n=20, log=lambda *a: None)
    publish(staged.stage, out)
    return out


@pytest.fixture(scope="module")
def model(bundle):
    # onnxruntime's float32 CPU path: the one whose answers equal PyTorch's exactly (auto may pick
    # OpenVINO's bf16 path on AMX CPUs, which agrees within the fp16 tolerances; tests/test_backends.py)
    return runtime.load(bundle, backend="cpu")


def torch_answers(checkpoint, samples):
    state = load_checkpoint(checkpoint)
    net = model_from_checkpoint(state).eval()
    vocab = Vocab(list(state["vocab"]))
    answers = []
    with torch.no_grad():
        for s in samples:
            image = torch.from_numpy(preprocess_image(s.image, net.cfg.image_size))[None]
            tokens, lengths, _ = encode_batch(vocab, [s.question])
            logits = net(image, torch.from_numpy(tokens), torch.from_numpy(lengths)).logits
            answers.append(state["answers"][int(logits.argmax())])
    return answers


def test_runtime_answers_exactly_as_pytorch_on_real_and_generated_data(model, tiny_checkpoint, tiny_data, real_sample):
    samples = load_clevr(real_sample, "val") + load_clevr(tiny_data, "val")
    expected = torch_answers(tiny_checkpoint, samples)
    assert [model.answer(s.image, s.question) for s in samples] == expected
    assert model.answer_batch([s.image for s in samples], [s.question for s in samples]) == expected


def test_the_runtime_never_imports_torch(bundle, real_sample):
    code = ("import sys, runtime; m = runtime.load(sys.argv[1]); "
            "print(m.answer(sys.argv[2], 'How many cubes are there?')); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    image = str(real_sample / "images/val/CLEVR_val_000010.png")
    r = subprocess.run([sys.executable, "-c", code, str(bundle), image], capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(REPO)})
    assert r.returncode == 0, r.stderr


def test_predict_reports_probabilities_routing_and_unknown_words(model, real_sample):
    image = real_sample / "images/val/CLEVR_val_000011.png"
    p = model.predict(image, "Is the flibbertigibbet cube red?", top_k=3)
    assert p.unknown_words == ["flibbertigibbet"]
    assert len(p.top_k) == 3 and p.top_k[0] == (p.answer, p.probability)
    assert abs(sum(pr for _, pr in model.predict(image, "Is the cube red?", top_k=1000).top_k) - 1) < 1e-6
    assert [len(g) for g in p.gates] == model.layer_sizes
    assert p.execution_ratio == [sum(g) / len(g) for g in p.gates]
    assert 0.0 <= p.overall_execution_ratio <= 1.0
    json.dumps(p.to_dict())


def test_every_image_form_gives_the_same_answer(model, real_sample):
    path = real_sample / "images/val/CLEVR_val_000012.png"
    q = "What color is the large sphere?"
    rgba = np.asarray(Image.open(path))
    assert rgba.shape[2] == 4
    forms = [path, str(path), path.read_bytes(), Image.open(path), rgba, rgba[:, :, :3].copy()]
    preds = [model.predict(f, q) for f in forms]
    assert len({(p.answer, round(p.probability, 6)) for p in preds}) == 1
    gray = model.predict(np.asarray(Image.open(path).convert("L")), q)
    assert gray.answer in model.answers


@pytest.mark.parametrize("image,message", [
    (b"", "empty"), (b"not an image", "cannot decode"), (np.zeros((0, 5, 3), np.uint8), "zero size"),
    (np.zeros((4, 4, 3), np.float32), "uint8"), (np.zeros((4, 4, 2), np.uint8), "HxW"), (42, "unsupported"),
    ("/nonexistent/image.png", "not found"),
])
def test_bad_images_raise_clear_errors(model, image, message):
    with pytest.raises(runtime.ImageError, match=message):
        model.answer(image, "How many cubes are there?")


def test_corrupt_image_file_names_the_file(model, real_sample, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes((real_sample / "images/val/CLEVR_val_000010.png").read_bytes()[:200])
    with pytest.raises(runtime.ImageError, match="broken.png"):
        model.answer(broken, "How many cubes are there?")


def test_bad_questions_raise_clear_errors(model, real_sample):
    image = real_sample / "images/val/CLEVR_val_000010.png"
    with pytest.raises(runtime.QuestionError, match="empty"):
        model.answer(image, "   ")
    with pytest.raises(runtime.QuestionError, match="empty"):
        model.answer(image, "?!")
    with pytest.raises(runtime.QuestionError, match="must be a str"):
        model.answer(image, None)
    too_long = " ".join(["cube"] * (model.max_question_len + 1))
    with pytest.raises(runtime.QuestionError, match=f"at most {model.max_question_len}"):
        model.answer(image, too_long)
    assert model.answer(image, " ".join(["cube"] * model.max_question_len)) in model.answers


def test_files_that_are_not_qgmrn_models_are_refused(tmp_path):
    with pytest.raises(runtime.ModelError, match="not found"):
        runtime.load(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"junk")
    with pytest.raises(runtime.ModelError, match="not a loadable ONNX model"):
        runtime.load(tmp_path / "junk.onnx")
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])
    plain = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 18)])
    onnx.save(plain, tmp_path / "plain.onnx")
    with pytest.raises(runtime.ModelError, match="not a QGMRN export"):
        runtime.load(tmp_path / "plain.onnx")
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(runtime.ModelError, match="not a QGMRN bundle"):
        runtime.load(tmp_path / "empty_dir")


def test_an_engine_without_its_build_record_is_refused(tmp_path):
    (tmp_path / "model.engine").write_bytes(b"\0" * 64)
    with pytest.raises(runtime.ModelError, match="rebuild it with python -m export.to_trt"):
        runtime.load(tmp_path / "model.engine", backend="tensorrt")
    with pytest.raises(runtime.ModelError, match="TensorRT engine; backend 'cpu' needs the .onnx"):
        runtime.load(tmp_path / "model.engine", backend="cpu")


def test_concurrent_answers_equal_serial_answers(model, real_sample, tiny_data):
    samples = (load_clevr(real_sample, "val") + load_clevr(tiny_data, "val")) * 2
    serial = [model.predict(s.image, s.question) for s in samples]
    with ThreadPoolExecutor(8) as pool:
        threaded = list(pool.map(lambda s: model.predict(s.image, s.question), samples))
    assert [(p.answer, p.probability, p.gates) for p in threaded] == [(p.answer, p.probability, p.gates) for p in serial]


def test_default_model_from_environment_and_setter(bundle, real_sample, monkeypatch):
    image = real_sample / "images/val/CLEVR_val_000010.png"
    runtime.set_default_model(None)
    monkeypatch.delenv("QGMRN_MODEL", raising=False)
    monkeypatch.setattr(runtime, "builtin_path", lambda: bundle / "no-such-builtin.onnx")   # an install without it
    with pytest.raises(runtime.NoModelConfigured, match="QGMRN_MODEL"):
        runtime.answer(image, "How many cubes are there?")
    monkeypatch.setenv("QGMRN_MODEL", str(bundle))
    first = runtime.answer(image, "How many cubes are there?")
    assert runtime.get_default_model() is runtime.get_default_model(), "loaded once and cached"
    runtime.set_default_model(None)
    monkeypatch.delenv("QGMRN_MODEL")
    runtime.set_default_model(bundle / "model.onnx")
    assert runtime.answer(image, "How many cubes are there?") == first
    runtime.set_default_model(None)


def test_cli_answers_and_prints_json(bundle, real_sample):
    image = str(real_sample / "images/val/CLEVR_val_000010.png")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    r = subprocess.run([sys.executable, "-m", "runtime", image, "How many cubes are there?", "--model", str(bundle),
                        "--json", "--top-k", "2"], capture_output=True, text=True, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert len(out["top_k"]) == 2 and "routing" in out and out["backend"].startswith(("onnxruntime", "OpenVINO"))
    r = subprocess.run([sys.executable, "-m", "runtime", image, "", "--model", str(bundle)],
                       capture_output=True, text=True, env=env)
    assert r.returncode == 2 and "question is empty" in r.stderr


def test_a_call_decodes_each_image_once_and_answers_as_one_question_at_a_time(model, real_sample, monkeypatch):
    import runtime.model as rm
    samples = load_clevr(real_sample, "val")[:40]                   # 4 images, 10 questions each
    images = [s.image for s in samples]
    questions = [s.question for s in samples]
    singly = [model.predict(im, q) for im, q in zip(images, questions)]
    decoded = []
    real = rm.load_rgb
    monkeypatch.setattr(rm, "load_rgb", lambda im: decoded.append(im) or real(im))
    batched = model.predict_batch(images, questions, batch_size=3)  # questions of one image straddle batches
    assert sorted(decoded) == sorted(set(images))                   # each distinct image decoded once
    assert [p.answer for p in batched] == [p.answer for p in singly]
    assert [p.gates for p in batched] == [p.gates for p in singly]
    np.testing.assert_allclose([p.probability for p in batched], [p.probability for p in singly], rtol=1e-5)
    # a bad image in a later batch is that image's error, in call order
    broken = images[:7] + [b"not an image"] + images[8:]
    with pytest.raises(runtime.ImageError, match="cannot decode image bytes"):
        model.predict_batch(broken, questions, batch_size=3)
