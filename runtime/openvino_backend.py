"""OpenVINO on the CPU, with the routing path kept in float32 while the visual network runs in
bfloat16 where the CPU multiplies bf16 in hardware.

OpenVINO's CPU plugin applies one inference precision to a compiled model, and its per-node
"keep float32" marks (disable_fp16_compression / precise rt_info) did not keep the GRU and routing
FC in float32 under a bf16 hint (measured with OpenVINO 2026.4: route logits moved by 2e-3 either
way). So the graph is split where the question meets the image: every node that does not depend
on the `image` input (embedding, GRU, routing FC, threshold) forms the question model, compiled in
float32; the rest (visual network and head) is compiled with the bf16 hint and receives the
question model's tensors as inputs. Gates are then computed exactly as in float32, so they agree
with PyTorch outside the near-threshold band, as for the fp16 ONNX graph.
"""
from __future__ import annotations

import contextlib
import threading
from pathlib import Path

import numpy as np

from .metadata import METADATA_KEY, check_metadata_against_shapes, check_weights_finite, parse_metadata
from .errors import ModelError

OUTPUTS = ("logits", "gates", "route_logits")


@contextlib.contextmanager
def keep_signal_stack():
    """Restore this thread's alternate signal stack on exit. Compiling and freeing two OpenVINO
    models in one process (OpenVINO 2026.4, CPU plugin) left the main thread's sigaltstack
    pointing at freed memory, so the next signal that Python handles on the alternate stack
    (SIGTERM, SIGINT: export's own handlers) crashed the process with SIGSEGV."""
    libc, old = None, None
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        old = _StackT()
        if libc.sigaltstack(None, ctypes.byref(old)) != 0:
            libc = None
    except (OSError, AttributeError):                   # not Linux/glibc: nothing to keep
        libc = None
    try:
        yield
    finally:
        if libc is not None and old is not None:
            import ctypes
            libc.sigaltstack(ctypes.byref(old), None)


def _stack_type():
    import ctypes

    class StackT(ctypes.Structure):                     # stack_t
        _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]
    return StackT


_StackT = _stack_type()


def cpu_has_bf16(core) -> bool:
    try:
        return "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    except Exception:                                   # older plugins without the property
        return False


def _dependent(model, inputs: tuple[str, ...]) -> set[str]:
    """Friendly names of the nodes whose value depends on any of these inputs."""
    stack = [p for p in model.get_parameters() if p.get_friendly_name() in inputs]
    seen = {p.get_friendly_name() for p in stack}
    while stack:
        node = stack.pop()
        for out in node.outputs():
            for target in out.get_target_inputs():
                child = target.get_node()
                name = child.get_friendly_name()
                if name not in seen:
                    seen.add(name)
                    stack.append(child)
    return seen


def split_and_compile(core, path: Path, visual_precision: str):
    """(compiled question model, compiled visual model, number of tensors passed between them).

    One read of the graph: the question model is compiled first (compiling copies it), then the
    same graph is cut for the visual model. Auto-generated node names differ between reads, so
    nothing is matched by name across two reads."""
    import openvino as ov
    from openvino import opset13 as ops

    model = core.read_model(str(path))
    raw = model.get_rt_info(["framework", METADATA_KEY]).astype(str) \
        if model.has_rt_info(["framework", METADATA_KEY]) else None
    visual = _dependent(model, ("image",))
    asked = _dependent(model, ("tokens", "lengths")) - visual        # the question path proper
    crossing, seen = [], set()                         # outputs of question nodes read by visual ones
    for node in model.get_ops():
        if node.get_friendly_name() not in visual or node.get_type_name() == "Parameter":
            continue
        for inp in node.inputs():
            src = inp.get_source_output()
            owner = src.get_node()
            key = (owner.get_friendly_name(), src.get_index())
            if owner.get_friendly_name() in asked and key not in seen:
                seen.add(key)
                crossing.append(src)
    results = {n: r for r in model.get_results() for n in r.input_value(0).get_names() | r.output(0).get_names()}
    params = {p.get_friendly_name(): p for p in model.get_parameters()}
    question = ov.Model([ops.result(src) for src in crossing] + [results["gates"], results["route_logits"]],
                        [params["tokens"], params["lengths"]], "qgmrn-question")
    compiled_q = core.compile_model(question, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    new_params = []
    for k, src in enumerate(crossing):
        p = ops.parameter(src.get_partial_shape(), src.get_element_type(), name=f"q{k}")
        for target in list(src.get_target_inputs()):
            if target.get_node().get_friendly_name() in visual:
                target.replace_source_output(p.output(0))
        new_params.append(p)
    vis = ov.Model([results["logits"]], [params["image"]] + new_params, "qgmrn-visual")
    compiled_v = core.compile_model(vis, "CPU", {"INFERENCE_PRECISION_HINT": visual_precision})
    return compiled_q, compiled_v, len(crossing), raw


class OpenVINORunner:
    """The bundle's ONNX through OpenVINO on the CPU: question path f32, visual path bf16 where the
    CPU supports it (precision="auto"), or everything f32 (precision="f32")."""

    def __init__(self, path: Path, precision: str = "auto", check_weights: bool = True):
        try:
            import openvino as ov
        except ImportError as e:
            raise ModelError("backend 'openvino' needs OpenVINO: pip install -e '.[openvino]'") from e
        core = ov.Core()
        visual_precision = "bf16" if precision in ("auto", "bf16") and cpu_has_bf16(core) else "f32"
        if precision == "bf16" and visual_precision != "bf16":
            raise ModelError("this CPU has no bfloat16 support for OpenVINO; use precision 'f32'")
        try:
            self._q, self._v, self.n_crossing, raw = split_and_compile(core, Path(path), visual_precision)
        except Exception as e:  # OpenVINO raises RuntimeError subclasses of its own
            raise ModelError(f"{path}: OpenVINO cannot compile this model: {e}") from e
        self.metadata = parse_metadata(raw, path)
        if check_weights:
            check_weights_finite(Path(path))
        dims = lambda port: [d.get_length() if d.is_static else None for d in port.get_partial_shape()]  # noqa: E731
        check_metadata_against_shapes(self.metadata, dims(self._v.outputs[0]), dims(self._q.outputs[-2]), path,
                                      dims(self._v.inputs[0]))
        self.precision = visual_precision
        self.name = f"OpenVINO {ov.__version__.split('-')[0]} (CPU, routing f32, visual {visual_precision})"
        self._q_out = list(self._q.outputs)
        self._local = threading.local()
        if len(self._v.inputs) != 1 + self.n_crossing or len(self._q_out) != 2 + self.n_crossing:
            raise ModelError(f"{path}: unexpected inputs after splitting the graph for OpenVINO")

    def _requests(self):
        """This thread's infer requests. A compiled model's __call__ shares one request among all
        callers: under threads that raised "Infer Request is busy" and mixed answers up."""
        reqs = getattr(self._local, "requests", None)
        if reqs is None:
            reqs = self._local.requests = (self._q.create_infer_request(), self._v.create_infer_request())
        return reqs

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        q_req, v_req = self._requests()
        q = q_req.infer({"tokens": feeds["tokens"], "lengths": feeds["lengths"]})
        out, crossing = {}, []
        for k, port in enumerate(self._q_out):
            value = q[port]
            if k < self.n_crossing:
                crossing.append(value)
            else:
                out[("gates", "route_logits")[k - self.n_crossing]] = value
        v = v_req.infer({i: x for i, x in enumerate([feeds["image"]] + crossing)})     # by position
        out["logits"] = v[self._v.outputs[0]]
        # copies: the request's own buffers are overwritten by this thread's next call
        return {k: np.array(out[k], dtype=np.float32) for k in OUTPUTS}
