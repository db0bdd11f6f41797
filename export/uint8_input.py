"""Bytes in (issue 40 part 2): a graph that takes the image as uint8 pixels, (batch, S, S, 3) at the
model's size, and does the float conversion, the normalisation and the NCHW layout itself.

    python -m export.uint8_input model.onnx model-u8.onnx [--check IMAGE ...]

The new nodes compute (x - mean * 255) * (1 / (std * 255)) in float32, with the same float32
constants as the runtime's lookup table (qgmrn.preprocess.normalize), so the graph sees bitwise the
pixels the float graph saw from the runtime: answers, logits and gates are identical. The runtime
reads the export's metadata ("image_input": "uint8-nhwc") and hands such a graph its decoded bytes;
older graphs (no "image_input") keep taking the normalised float tensor. Resizing stays in the
runtime (Pillow), before the graph.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from qgmrn.preprocess import _INV_STD, _MEAN      # the runtime table's own float32 constants
from runtime.metadata import UINT8_NHWC


def to_uint8_input(proto, metadata_key: str = "qgmrn"):
    """The same ModelProto with its float NCHW `image` input replaced by uint8 NHWC pixels."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    graph = proto.graph
    image = next((i for i in graph.input if i.name == "image"), None)
    if image is None:
        raise ValueError("the graph has no 'image' input")
    if image.type.tensor_type.elem_type != TensorProto.FLOAT:
        raise ValueError("the graph's image input is not float32 (already uint8?)")
    dims = image.type.tensor_type.shape.dim
    if len(dims) != 4 or dims[1].dim_value != 3:
        raise ValueError("the graph's image input is not (batch, 3, S, S)")
    size_h, size_w = dims[2].dim_value, dims[3].dim_value
    batch = dims[0].dim_param or dims[0].dim_value
    internal = "image_normalised"
    for node in graph.node:                              # the old input becomes an inner tensor
        node.input[:] = [internal if name == "image" else name for name in node.input]
    graph.initializer.extend([numpy_helper.from_array(_MEAN.reshape(1, 3, 1, 1), "image_mean255"),
                              numpy_helper.from_array(_INV_STD.reshape(1, 3, 1, 1), "image_inv_std255")])
    # the layout first, on bytes (a quarter of the float tensor's), then the float arithmetic
    head = [helper.make_node("Transpose", ["image"], ["image_nchw_u8"], perm=[0, 3, 1, 2], name="image/nchw"),
            helper.make_node("Cast", ["image_nchw_u8"], ["image_f32"], to=TensorProto.FLOAT, name="image/cast"),
            helper.make_node("Sub", ["image_f32", "image_mean255"], ["image_centred"], name="image/sub"),
            helper.make_node("Mul", ["image_centred", "image_inv_std255"], [internal], name="image/mul")]
    nodes = head + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    new_input = helper.make_tensor_value_info("image", TensorProto.UINT8, [batch, size_h, size_w, 3])
    index = list(graph.input).index(image)
    graph.input.remove(image)
    graph.input.insert(index, new_input)
    for entry in proto.metadata_props:
        if entry.key == metadata_key:
            meta = json.loads(entry.value)
            meta["image_input"] = UINT8_NHWC
            entry.value = json.dumps(meta)
    onnx.checker.check_model(proto, full_check=True)
    return proto


def convert(src: str | Path, dst: str | Path) -> Path:
    """Write the uint8-input graph of the export `src` to `dst` (whole, or not at all)."""
    import onnx
    from qgmrn.files import atomic_file
    proto = to_uint8_input(onnx.load(str(src)))
    with atomic_file(dst, binary=True) as f:
        f.write(proto.SerializeToString())
    return Path(dst)


def _fail(text: str, code: int = 2) -> int:
    print(f"error: {text}", file=sys.stderr)
    return code


def _same_answers(src: Path, data: bytes, images: list[str]) -> bool:
    """Both graphs answer 'How many objects are there?' about each image alike; the new graph is
    read from a private temporary copy, so nothing is written at dst before it is proven."""
    import tempfile

    import runtime
    with tempfile.TemporaryDirectory(prefix="qgmrn-uint8-") as tmp:
        candidate = Path(tmp) / "model.onnx"
        candidate.write_bytes(data)
        before = runtime.Model(src, backend="onnxruntime")
        after = runtime.Model(candidate, backend="onnxruntime")
        q = ["How many objects are there?"] * len(images)
        p0, p1 = before.predict_batch(images, q), after.predict_batch(images, q)
    return all(x.answer == y.answer and x.gates == y.gates and x.probability == y.probability for x, y in zip(p0, p1))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.uint8_input", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("src", help="an exported float32 graph (.onnx)")
    ap.add_argument("dst", help="where the uint8-input graph goes")
    ap.add_argument("--check", nargs="*", default=[], metavar="IMAGE",
                    help="images to prove it on: both graphs answer 'How many objects are there?' alike")
    ap.add_argument("--overwrite", action="store_true", help="replace an existing dst")
    a = ap.parse_args(argv)
    try:
        import onnx
    except ImportError:
        return _fail("converting needs the onnx package: pip install -e '.[train]'")
    from qgmrn.files import write_atomic
    from qgmrn.preprocess import ImageError, load_rgb
    from runtime.errors import ModelError
    src, dst = Path(a.src), Path(a.dst)
    if not src.is_file():
        return _fail(f"{src} is not a file")
    if dst.resolve() == src.resolve():
        return _fail("write the uint8 graph to another file than its source")
    if dst.exists() and not a.overwrite:
        return _fail(f"{dst} already exists; pass --overwrite to replace it")
    for image in a.check:                          # every check image is usable before any work
        try:
            load_rgb(image)
        except ImageError as e:
            return _fail(f"--check: {e}")
    try:
        proto = onnx.load(str(src))
    except Exception as e:                         # protobuf's DecodeError and friends: not an ONNX file
        return _fail(f"{src} is not an ONNX model ({type(e).__name__}); give an exported .onnx graph")
    try:
        data = to_uint8_input(proto).SerializeToString()
    except (ValueError, onnx.checker.ValidationError) as e:
        return _fail(f"{src}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    if a.check:
        try:
            same = _same_answers(src, data, a.check)
        except (ModelError, ImageError) as e:
            return _fail(f"--check: {str(e).splitlines()[0]}")
        if not same:
            return _fail(f"the uint8 graph does not answer as its source; nothing was written to {dst}", 1)
        print(f"checked on {len(a.check)} images: identical answers, probabilities and gates")
    try:
        write_atomic(dst, data)
    except OSError as e:
        return _fail(f"cannot write {dst}: {e.strerror or e}")
    print(f"wrote {dst} (image input: uint8, (batch, S, S, 3))")
    return 0


if __name__ == "__main__":
    sys.exit(main())
