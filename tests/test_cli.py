"""The `qgmrn` command: --help lists the tools, --version names what is installed, each subcommand
is its `python -m` module with the same options, and a missing extra is one line."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from qgmrn import __version__
from qgmrn.cli import COMMANDS, main

EXAMPLE = sorted((Path(__file__).resolve().parents[1] / "runtime" / "examples").glob("*.png"))[0]


def test_help_lists_every_subcommand_and_version_names_the_package(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for name in ("train", "evaluate", "generate", "export", "benchmark", "answer", "serve", "demo", "analyze"):
        assert f"    {name} " in out or f"    {name}\n" in out, name
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.startswith(f"qgmrn {__version__} (Python ")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_each_subcommand_takes_its_tools_options(name, capsys):
    if name in ("analyze",) and importlib.util.find_spec("sklearn") is None:
        pytest.skip("the analysis extra is not installed")
    with pytest.raises(SystemExit) as e:
        main([name, "--help"])
    assert e.value.code == 0
    assert capsys.readouterr().out.startswith(f"usage: qgmrn {name} ")


def test_answer_dispatches_to_the_runtime_with_its_options(capsys):
    assert main(["answer", str(EXAMPLE), "How many objects are there?", "--json"]) == 0
    via_cli = capsys.readouterr().out
    from runtime.__main__ import main as runtime_main
    assert runtime_main([str(EXAMPLE), "How many objects are there?", "--json"]) == 0
    assert via_cli == capsys.readouterr().out and '"answer"' in via_cli
    assert main(["answer", str(EXAMPLE), "   "]) == 2                  # the tool's own error handling
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:")


def test_a_subcommand_without_its_extra_says_which_in_one_line(monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n in ("torch", "gradio") else real(n, *a))
    assert main(["train", "--steps", "1"]) == 2
    assert capsys.readouterr().err.strip() == ("error: qgmrn train needs torch, which is not installed: "
                                               "pip install torch==2.13.0 && pip install -e '.[train]'")
    assert main(["demo"]) == 2
    assert "pip install -e '.[demo]'" in capsys.readouterr().err


def test_unknown_subcommand_and_no_subcommand_exit_2(capsys):
    with pytest.raises(SystemExit) as e:
        main(["trian"])
    assert e.value.code == 2 and "invalid choice: 'trian'" in capsys.readouterr().err
    assert main([]) == 2


def test_the_console_script_is_installed():
    exe = Path(sys.executable).with_name("qgmrn")
    if not exe.exists():
        pytest.skip("the qgmrn console script is not installed beside this interpreter (pip install -e .)")
    done = subprocess.run([str(exe), "--version"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.startswith("qgmrn ")
