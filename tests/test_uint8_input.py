"""Bytes in (issue 40 part 2): a graph converted to take uint8 pixels answers as its float source,
bitwise, through the runtime (which hands it the decoded bytes); old graphs keep their float input."""
import numpy as np
import pytest

import runtime
from export.uint8_input import main as convert_main

pytest.importorskip("onnx")


def test_the_uint8_graph_answers_bitwise_as_the_float_graph(tiny_bundle, real_sample, tmp_path, capsys):
    src, dst = tiny_bundle / "model.onnx", tmp_path / "model-u8.onnx"
    images = sorted(str(p) for p in (real_sample / "images" / "val").glob("*.png"))[:4]
    assert convert_main([str(src), str(dst), "--check", *images]) == 0
    assert "identical answers" in capsys.readouterr().out
    before, after = runtime.Model(src, backend="onnxruntime"), runtime.Model(dst, backend="onnxruntime")
    assert (before.image_input, after.image_input) == ("float-nchw", "uint8-nhwc")
    import onnxruntime as ort
    spec = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"]).get_inputs()[0]
    assert spec.name == "image" and spec.type == "tensor(uint8)" and spec.shape[1:] == [after.image_size] * 2 + [3]
    questions = ["How many cubes are there?", "Is there a red sphere?", "What size is the cylinder?",
                 "Are there more cubes than spheres?"] * 3
    ims = (images * 3)[:len(questions)]
    for batch_size in (16, 5):                        # one batch, and the streamed path
        p0 = before.predict_batch(ims, questions, batch_size=batch_size)
        p1 = after.predict_batch(ims, questions, batch_size=batch_size)
        for x, y in zip(p0, p1):
            assert x.answer == y.answer and x.gates == y.gates
            assert x.probability == y.probability and x.top_k == y.top_k     # bitwise: the same pixels
    # a uint8 array, a PIL image and bytes are all the same bytes in
    arr = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(images[0]).convert("RGB"))
    assert after.predict(arr, questions[0]).to_dict() == before.predict(arr, questions[0]).to_dict()


def test_converting_twice_or_a_foreign_input_is_one_line(tiny_bundle, tmp_path, capsys):
    dst = tmp_path / "u8.onnx"
    assert convert_main([str(tiny_bundle / "model.onnx"), str(dst)]) == 0
    capsys.readouterr()
    assert convert_main([str(dst), str(tmp_path / "again.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not float32 (already uint8?)" in err[0] and not (tmp_path / "again.onnx").exists()
    assert convert_main([str(tmp_path / "missing.onnx"), str(tmp_path / "x.onnx")]) == 2
    assert convert_main([str(dst), str(dst)]) == 2


def test_an_image_input_the_runtime_does_not_know_is_refused(tiny_bundle, tmp_path):
    from conftest import with_metadata
    bad = with_metadata(tiny_bundle / "model.onnx", tmp_path / "bad.onnx", lambda m: m.update(image_input="rgb565"))
    with pytest.raises(runtime.ModelError, match="image input 'rgb565'"):
        runtime.Model(bad, backend="onnxruntime")


def test_mistakes_in_a_conversion_are_one_line_and_write_nothing(tiny_bundle, tiny_checkpoint, real_sample, tmp_path,
                                                                 capsys):
    """Trust round 5 (M6, m1): a text file or a checkpoint as the source, a missing or non-image
    --check file, and an existing destination without --overwrite: one line, exit 2, no traceback,
    and nothing written or replaced."""
    src, dst = tiny_bundle / "model.onnx", tmp_path / "u8.onnx"
    notes = tmp_path / "notes.txt"
    notes.write_text("hello")
    image = str(sorted((real_sample / "images" / "val").glob("*.png"))[0])
    for args, words in (([str(notes), str(dst)], "is not an ONNX model"),
                        ([str(tiny_checkpoint), str(dst)], "is not an ONNX model"),
                        ([str(src), str(dst), "--check", str(tmp_path / "none.png")], "image file not found"),
                        ([str(src), str(dst), "--check", str(notes)], "cannot decode")):
        assert convert_main(args) == 2
        err = capsys.readouterr().err
        assert words in err and len(err.strip().splitlines()) == 1 and not dst.exists(), err
    dst.write_bytes(b"the user's file")
    assert convert_main([str(src), str(dst)]) == 2
    assert "--overwrite" in capsys.readouterr().err and dst.read_bytes() == b"the user's file"
    assert convert_main([str(src), str(dst), "--check", image, "--overwrite"]) == 0
    assert runtime.Model(dst, backend="onnxruntime").image_input == "uint8-nhwc"


def test_a_float_graph_whose_metadata_says_uint8_names_the_input_type(tiny_bundle, tmp_path):
    """Trust round 5, m5: the error named the image size, which was right, not the input type."""
    from conftest import with_metadata
    from runtime.errors import ModelError
    bad = with_metadata(tiny_bundle / "model.onnx", tmp_path / "bad.onnx", lambda m: m.update(image_input="uint8-nhwc"))
    with pytest.raises(ModelError, match=r"image input takes uint8 pixels \(batch, S, S, 3\)"):
        runtime.Model(bad, backend="onnxruntime")


def test_a_full_disk_names_the_destination(tiny_bundle, tmp_path, monkeypatch, capsys):
    """Trust round 5, m5: a write error named the source."""
    import errno
    import qgmrn.files

    def full(path, data):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(qgmrn.files, "write_atomic", full)
    dst = tmp_path / "u8.onnx"
    assert convert_main([str(tiny_bundle / "model.onnx"), str(dst)]) == 2
    err = capsys.readouterr().err
    assert f"cannot write {dst}: No space left on device" in err and str(tiny_bundle) not in err
