"""The `qgmrn` command: one entry point for every tool, each subcommand taking exactly the options
of its `python -m` module (which keeps working).

    qgmrn --help                    the subcommands
    qgmrn --version                 qgmrn's version and what is installed beside it
    qgmrn SUBCOMMAND --help         that tool's options
    qgmrn answer IMAGE "QUESTION"   (base install: answer, serve and demo need no torch)

A subcommand whose extra is not installed says which one in one line and exits with status 2.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import sys
from importlib import metadata
from typing import NamedTuple

from . import __version__

TORCH = "pip install torch==2.13.0 && pip install -e '.[train]'"


class Command(NamedTuple):
    module: str                               # what `python -m` runs
    summary: str
    needs: tuple[tuple[str, str], ...] = ()   # (importable module, the install line that brings it)


TRAIN = (("torch", TORCH),)
COMMANDS: dict[str, Command] = {
    "train": Command("qgmrn.train", "train QGMRN (BRN / FRN, optional attention head); torchrun scales it", TRAIN),
    "evaluate": Command("qgmrn.evaluate", "accuracy per question type and routing use of a checkpoint", TRAIN),
    "generate": Command("qgmrn.data.generate", "a CLEVR-style dataset: Pillow drawings, or Blender renders "
                                               "(--renderer blender, --ray for a cluster)"),
    "prepare": Command("qgmrn.data.prepare", "decode and resize a dataset's images into the training cache"),
    "export": Command("export.to_trt", "checkpoint -> ONNX (+ TensorRT engine where TensorRT and a GPU exist), "
                                       "parity proven", TRAIN),
    "export-onnx": Command("export.to_onnx", "checkpoint -> ONNX bundle with parity rows, no TensorRT", TRAIN),
    "export-uint8": Command("export.uint8_input", "ONNX graph -> one that takes uint8 pixels (bytes in)",
                           (("onnx", "pip install -e '.[train]'"),)),
    "benchmark": Command("export.benchmark", "latency of the exported model per backend beside PyTorch", TRAIN),
    "answer": Command("runtime", "answer a question about an image (torch-free runtime)"),
    "serve": Command("runtime.serve", "the HTTP API (and the demo page) on a local engine or Ray Serve",
                     (("fastapi", "pip install -e '.[serve]'"), ("uvicorn", "pip install -e '.[serve]'"))),
    "demo": Command("runtime.demo", "the browser demo that shows which modules a question switches on",
                    (("fastapi", "pip install -e '.[demo]'"), ("gradio", "pip install -e '.[demo]'"))),
    "analyze": Command("qgmrn.analyze", "the paper's analyses: routing t-SNE, saliency, execution ratios",
                       (*TRAIN, ("matplotlib", "pip install -e '.[analysis]'"),
                        ("sklearn", "pip install -e '.[analysis]'"))),
    "ablate": Command("qgmrn.ablate", "the paper's module-removal ablation on a checkpoint", TRAIN),
}
# What `qgmrn --version` lists beside qgmrn (distribution names)
COMPONENTS = ("torch", "onnxruntime", "openvino", "tensorrt", "ray", "gradio", "bpy")


def version_line() -> str:
    found = []
    for dist in COMPONENTS:
        with contextlib.suppress(metadata.PackageNotFoundError):
            found.append(f"{dist} {metadata.version(dist)}")
    py = ".".join(map(str, sys.version_info[:3]))
    return f"qgmrn {__version__} (Python {py}; {', '.join(found) or 'no optional components'})"


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog="qgmrn", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Question Guided Modular Routing Networks: train, export, answer and serve.",
        epilog="Each subcommand takes its tool's options: qgmrn SUBCOMMAND --help. The same tools run as "
               "python -m MODULE (listed in brackets).")
    ap.add_argument("--version", action="version", version=version_line())
    sub = ap.add_subparsers(dest="command", metavar="SUBCOMMAND", title="subcommands")
    for name, cmd in COMMANDS.items():
        sub.add_parser(name, help=f"{cmd.summary} [{cmd.module}]", add_help=False)
    return ap


@contextlib.contextmanager
def _named(prog: str):
    """The tool's own parser says `qgmrn NAME` in its usage line instead of `python -m MODULE`."""
    original = argparse.ArgumentParser.__init__

    def init(self, *args, **kwargs):
        if str(kwargs.get("prog", "")).startswith("python -m"):
            kwargs["prog"] = prog
        original(self, *args, **kwargs)

    argparse.ArgumentParser.__init__ = init            # type: ignore[method-assign]
    try:
        yield
    finally:
        argparse.ArgumentParser.__init__ = original    # type: ignore[method-assign]


def missing(cmd: Command) -> str | None:
    """The install line for the first module `cmd` needs that is not importable, or None."""
    for module, install in cmd.needs:
        if importlib.util.find_spec(module) is None:
            return f"{module}, which is not installed: {install}"
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS:
        ap = parser()
        if not argv:
            ap.print_help()
            return 2
        ap.parse_args(argv[:1])               # --help, --version, or an unknown subcommand: argparse's line
        return 2
    name, rest = argv[0], argv[1:]
    cmd = COMMANDS[name]
    why = missing(cmd)
    if why:
        print(f"error: qgmrn {name} needs {why}", file=sys.stderr)
        return 2
    module = importlib.import_module(_entry(cmd.module))
    with _named(f"qgmrn {name}"):
        code = module.main(rest)
    return int(code or 0)


def _entry(module: str) -> str:
    """The module that defines main() for `python -m module`."""
    if module in ("runtime", "runtime.demo"):
        return module + ".__main__"
    return module


if __name__ == "__main__":
    sys.exit(main())
