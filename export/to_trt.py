"""Checkpoint -> verified ONNX bundle -> TensorRT engine, with parity proven for each artefact.

    python -m export.to_trt ckpt.pt [--out DIR] [--fp16] [--min-batch 1 --opt-batch 8 --max-batch 64]
                            [--workspace-mib 2048] [--tf32]

Does everything export.to_onnx does, then builds DIR/model.engine (+ model.engine.json: TensorRT
version, GPU, compute capability, ONNX hash) where TensorRT and a CUDA GPU exist, and checks its
parity against PyTorch. Without them the verified ONNX bundle is still written, the command says
what is missing, and exits with status 3.
"""
from __future__ import annotations

if __name__ == "__main__":                      # a base install: one line, not torch's traceback
    from qgmrn.extras import require
    require("torch", "python -m export.to_trt")

import argparse
import shutil
import sys
from pathlib import Path

from .bundle import ONNX_FP16_NAME, ExportError, default_out, keep_failed, publish, write_report
from .precision import _line
from .onnx_export import build_metadata, export_onnx
from .parity import TOLERANCES, compare, run_backend
from .to_onnx import add_common_args, exit_code, run_export
from .trt import EngineOptions, build_engine, missing_requirements

EXIT_NO_TENSORRT = 3


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.to_trt", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    ap.add_argument("--min-batch", type=int, default=1)
    ap.add_argument("--opt-batch", type=int, default=8)
    ap.add_argument("--max-batch", type=int, default=64)
    ap.add_argument("--max-len", type=int, default=0, help="longest question in tokens (default: the model's)")
    ap.add_argument("--workspace-mib", type=int, default=2048)
    ap.add_argument("--tf32", action="store_true", help="allow TF32 (off by default: parity builds)")
    a = ap.parse_args(argv)
    if not 1 <= a.min_batch <= a.opt_batch <= a.max_batch:
        ap.error("need 1 <= --min-batch <= --opt-batch <= --max-batch")
    if a.max_len < 0:
        ap.error(f"--max-len must be 0 (the model's) or a positive number of tokens, got {a.max_len}")
    if a.workspace_mib < 1:
        ap.error(f"--workspace-mib must be at least 1, got {a.workspace_mib}")
    missing = missing_requirements()

    def body() -> int:
        staged = run_export(a)
        if missing:
            write_report(staged.stage, staged.report)
            publish(staged.stage, staged.out)
            print(f"wrote and verified the ONNX bundle {staged.out}, but built no TensorRT engine:\n  - "
                  + "\n  - ".join(missing)
                  + "\nOn a machine with an NVIDIA GPU: pip install -e '.[gpu]', then run this command again "
                  "(or serve the .onnx with onnxruntime-gpu; see README, GPU install).", file=sys.stderr)
            return EXIT_NO_TENSORRT
        from runtime.trt_engine import trt_major
        # Engines are built from the paper's grouped convs: model.onnx merges narrow groups for
        # onnxruntime's CPU kernels, which multiplies the grouped convs' work on a GPU (up to 8x).
        groups = staged.stage.parent / f".{staged.out.name}.groups.onnx"
        export_onnx(staged.model, groups, build_metadata(staged.state, staged.report["checkpoint_sha256"], "fp32"),
                    merge_groups=False)
        builds = [("trt-fp32", groups, "model.engine", False)]
        if a.fp16:       # TensorRT 11 is strongly typed: its fp16 engine comes from the fp16 graph
            builds.append(("trt-fp16", staged.stage / ONNX_FP16_NAME if trt_major() >= 11 else groups,
                           "model.fp16.engine", True))
        try:
            for key, onnx_path, engine_name, fp16 in builds:
                opts = EngineOptions(fp16=fp16, min_batch=a.min_batch, opt_batch=a.opt_batch,
                                     max_batch=a.max_batch, max_len=a.max_len, workspace_mib=a.workspace_mib,
                                     tf32=a.tf32)
                try:
                    engine = build_engine(onnx_path, staged.stage / engine_name, opts)
                except Exception as e:  # TensorRT raises plain RuntimeError/TypeError subclasses
                    raise ExportError(f"TensorRT could not build {engine_name}: {e}. Nothing was published", 1) from e
                result = engine_parity(engine, staged, a.max_batch, TOLERANCES["fp16" if fp16 else "fp32"])
                staged.report["artefacts"][key] = result
                print(_line(key, result))
        except BaseException:
            shutil.rmtree(staged.stage, ignore_errors=True)            # no staging directory is left behind
            raise
        finally:
            groups.unlink(missing_ok=True)
        staged.report["passed"] = all(r["passed"] for r in staged.report["artefacts"].values() if not r.get("advisory"))
        write_report(staged.stage, staged.report)
        if not staged.report["passed"]:
            failed = keep_failed(staged.stage, staged.out)
            raise ExportError(f"TensorRT parity failed; nothing was published (see {failed}/parity.json)", 1)
        publish(staged.stage, staged.out)
        print(f"wrote {staged.out}: ONNX and TensorRT engines, parity within tolerance")
        return 0
    return exit_code(body, Path(a.out) if a.out else default_out(a.checkpoint))


def engine_parity(engine: Path, staged, max_batch: int, tolerance) -> dict:
    """PyTorch (the staged reference outputs) vs the engine on the same parity batches."""
    from runtime.trt_engine import TrtRunner
    runner = TrtRunner(engine)
    other = run_backend(runner, staged.batches, max_batch)
    result = compare(staged.reference, other, staged.model.cfg.layer_sizes, tolerance, labels=staged.labels)
    result.update(file=engine.name, bytes=engine.stat().st_size, backend=f"TensorRT {runner.info['tensorrt_version']}",
                  gpu=runner.info["gpu_name"], compute_capability=runner.info["compute_capability"])
    return result

if __name__ == "__main__":
    sys.exit(main())
