"""One line instead of a traceback when a command's optional dependency is missing."""
from __future__ import annotations

import sys

INSTALL = {"torch": "pip install torch==2.13.0 && pip install -e '.[train]'"}


def require(module: str, command: str, cli_only: bool = False) -> None:
    """Exit with status 2 and one line naming what to install when `module` cannot be imported.
    cli_only: only while `python -m` is starting a command (sys.argv[0] is still "-m"); a library
    import gets the ImportError as usual."""
    try:
        __import__(module)
    except ImportError:
        if cli_only and sys.argv[:1] != ["-m"]:
            raise
        print(f"error: {command} needs {module}, which is not installed: "
              f"{INSTALL.get(module, f'pip install {module}')}", file=sys.stderr)
        sys.exit(2)
