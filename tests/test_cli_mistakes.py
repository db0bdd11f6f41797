"""Command-line mistakes are one line and a non-zero exit, never a traceback (trust round 5, M6)."""
import pytest

import qgmrn.train as train_mod


def _train(args, capsys):
    try:
        code = train_mod.main(args)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err.strip()


def test_a_checkpoint_or_a_deeply_nested_file_as_config_is_one_line(tiny_checkpoint, tmp_path, capsys):
    code, err = _train(["--config", str(tiny_checkpoint), "--out", str(tmp_path / "a")], capsys)
    assert code == 2 and "Traceback" not in err
    assert "not a JSON text file" in err.splitlines()[-1] and "--resume" in err.splitlines()[-1]
    nested = tmp_path / "nested.json"
    nested.write_text("[" * 100_000 + "]" * 100_000)
    code, err = _train(["--config", str(nested), "--out", str(tmp_path / "b")], capsys)
    assert code == 2 and "nested too deeply" in err.splitlines()[-1] and "Traceback" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


@pytest.mark.parametrize("value", ["abc", "-1", "nan", "0"])
def test_a_bad_header_deadline_in_the_environment_is_one_line(monkeypatch, capsys, value):
    pytest.importorskip("uvicorn")
    from runtime.serve import main as serve_main
    monkeypatch.setenv("QGMRN_HEADER_SECONDS", value)
    assert serve_main(["--port", "8765", "--no-demo"]) == 2
    err = capsys.readouterr().err.strip()
    assert "QGMRN_HEADER_SECONDS" in err and "positive number of seconds" in err and len(err.splitlines()) == 1
