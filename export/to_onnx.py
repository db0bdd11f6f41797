"""Checkpoint -> verified ONNX bundle.

    python -m export.to_onnx ckpt.pt [--out DIR] [--fp16] [--int8 [--calib N]] [--data-root DIR | --jsonl FILE]

Writes DIR/model.onnx (and model.fp16.onnx with --fp16, model.int8.onnx with --int8) with the
runtime's metadata inside, and DIR/parity.json: one row per artefact x CPU backend x precision,
PyTorch vs each on real inputs, pass or fail, with its batch-1/8 latency here. Publishes only when
model.onnx holds parity (1e-4); a reduced-precision file is judged by its answers (gates identical
outside the near-threshold band, top-1 >= 99%, accuracy within 0.5 points of PyTorch's) and left
out when no backend passed with it. The runtime's auto runs the fastest row that passed.
"""
from __future__ import annotations

if __name__ == "__main__":                      # a base install: one line, not torch's traceback
    from qgmrn.extras import require
    require("torch", "python -m export.to_onnx")

import argparse
import signal
import sys
from pathlib import Path

from qgmrn.checkpoint import CheckpointError
from qgmrn.data.sources import DataError
from qgmrn.files import Busy, FileLock, os_error_line
from qgmrn.preprocess import ImageError, QuestionError

from .bundle import ExportError, default_out, export_checkpoint, publish, remove_own_stages, write_report


def add_common_args(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("checkpoint", help="a checkpoint written by python -m qgmrn.train")
    ap.add_argument("--out", help="bundle directory (default: CKPT-export beside the checkpoint)")
    ap.add_argument("--fp16", action="store_true", help="also write model.fp16.onnx (routing stays float32)")
    ap.add_argument("--int8", action="store_true",
                    help="also write model.int8.onnx: int8 convolutions calibrated on the run's training images "
                         "(question path and routing stay float32), kept where it passes parity by its answers")
    ap.add_argument("--calib", type=int, default=256, help="calibration images for --int8 (default 256)")
    ap.add_argument("--data-root", help="CLEVR layout whose val split feeds the parity check")
    ap.add_argument("--jsonl", help="JSON-lines file whose questions feed the parity check")
    ap.add_argument("--parity-samples", type=int, default=400,
                    help="parity inputs (default 400: auto uses a reduced precision judged on at least 400)")
    ap.add_argument("--overwrite", action="store_true",
                    help="replace an export already in --out (other files there are never touched)")


def run_export(a, log=print):
    return export_checkpoint(a.checkpoint, a.out, fp16=a.fp16, data_root=a.data_root, jsonl=a.jsonl,
                             parity_n=a.parity_samples, log=log, overwrite=a.overwrite, int8=a.int8, calib=a.calib)


class Stopped(Exception):
    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _no_file_above(out: Path) -> None:
    """--out under a file is a usage error that names the file (mkdir says only "File exists")."""
    for above in out.absolute().parents:
        if above.exists():
            if not above.is_dir():
                raise ExportError(f"cannot write to {out}: {above} is a file, not a folder", 2)
            return


def exit_code(body, out: Path) -> int:
    """Run a CLI body that exports into `out`; bad input, failed parity, a full disk, a second
    export into the same folder and SIGINT/SIGTERM become one message and an exit status, and no
    staging directory is left behind."""
    def stop(signum, _frame):
        raise Stopped(signum)
    old = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    lock = None
    try:
        try:
            _no_file_above(out)
            out.parent.mkdir(parents=True, exist_ok=True)
            lock = FileLock(out.parent / f".{out.name}.export-lock", f"{out} (another export is writing it)")
        except OSError as e:                      # --out under a file, a read-only folder: a usage error
            raise ExportError(f"cannot write to {out.parent}: {e.strerror or e}", 2) from e
        return body()
    except (CheckpointError, DataError, Busy, ImageError, QuestionError) as e:   # parity/calibration data
        print(f"error: {e}", file=sys.stderr)
        return 2
    except ExportError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.code
    except Stopped as e:
        print(f"error: stopped by {e}; nothing was published", file=sys.stderr)
        return 128 + e.signum
    except OSError as e:                          # a full disk, a read-only folder, ...
        print(f"error: cannot write the export: {os_error_line(e, out)}; nothing was published",
              file=sys.stderr)
        return 1
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        remove_own_stages()                       # what this export staged and did not publish
        if lock is not None:
            lock.release()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m export.to_onnx", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(ap)
    a = ap.parse_args(argv)

    def body() -> int:
        staged = run_export(a)
        write_report(staged.stage, staged.report)
        publish(staged.stage, staged.out)
        rows = staged.report["artefacts"]
        print(f"wrote {staged.out} (parity.json: " + ", ".join(
            f"{k} {'passed' if r['passed'] else 'failed'}" for k, r in rows.items()) + ")")
        return 0
    return exit_code(body, Path(a.out) if a.out else default_out(a.checkpoint))


if __name__ == "__main__":
    sys.exit(main())
