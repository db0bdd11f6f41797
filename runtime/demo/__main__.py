"""python -m runtime.demo [--model PATH|builtin] [--host 127.0.0.1] [--port 7860]: the browser page
and the HTTP API on one local server (runtime.serve --engine local)."""
from __future__ import annotations

import argparse
import importlib.util
import sys

INSTALL_HINT = "error: the demo needs Gradio: pip install -e '.[demo]'"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m runtime.demo", description=__doc__)
    ap.add_argument("--model", default="builtin", help="a bundle, an .onnx, or 'builtin' (default)")
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=7860)
    a = ap.parse_args(argv)
    if importlib.util.find_spec("gradio") is None or importlib.util.find_spec("fastapi") is None:
        print(INSTALL_HINT, file=sys.stderr)
        return 2
    from ..serve import main as serve
    return serve(["--engine", "local", "--model", a.model, "--host", a.host, "--port", str(a.port)])


if __name__ == "__main__":
    sys.exit(main())
