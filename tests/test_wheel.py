"""The built wheel, not the checkout (issue 42 part 3): `python -m build` makes an sdist and a wheel;
the wheel, installed into a fresh venv without torch, answers with the built-in model, carries the
demo's example scenes and the model card, and `qgmrn serve` from it answers over HTTP; a
subcommand that needs torch says so in one line."""
import base64
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import urllib.request
import venv
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGED = ("runtime/models/builtin.json", "runtime/examples/examples.json", "runtime/examples/scene1.png")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def dist(tmp_path_factory) -> Path:
    pytest.importorskip("build", reason="the build package is not installed (pip install -e '.[dev]')")
    out = tmp_path_factory.mktemp("dist")
    # no --sdist/--wheel: the wheel is built from the unpacked sdist, as pip builds from PyPI, so a
    # file missing from the sdist fails here, and the checkout gets no build/ folder of stale copies
    done = subprocess.run([sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def env(dist, tmp_path_factory) -> Path:
    """A fresh venv (no system site-packages) with the wheel and its [serve] extra: no torch."""
    root = tmp_path_factory.mktemp("venv") / "v"
    venv.create(root, with_pip=True, clear=True)
    wheel = next(dist.glob("qgmrn-*.whl"))
    # outside the checkout and without PYTHONPATH: pip must not find the checkout's egg-info (the
    # sdist build leaves one) and call the wheel "already satisfied"
    done = subprocess.run([str(root / "bin" / "python"), "-m", "pip", "install", "-q",
                           "--disable-pip-version-check", f"{wheel}[serve]"],
                          capture_output=True, text=True, timeout=900, cwd=root.parent,
                          env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})
    if done.returncode and "Could not find a version" in done.stderr + done.stdout:
        pytest.skip(f"the package registry is not reachable: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert list(root.glob("lib/python*/site-packages/qgmrn-*.dist-info")), "the wheel was not installed in the venv"
    return root


def _run(env: Path, *args, cwd) -> subprocess.CompletedProcess:
    return subprocess.run([str(env / "bin" / args[0]), *args[1:]], capture_output=True, text=True,
                          timeout=300, cwd=cwd, env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"})


@pytest.mark.slow
def test_wheel_and_sdist_carry_the_model_its_card_and_the_example_scenes(dist):
    wheel = next(dist.glob("qgmrn-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    onnx = [n for n in names if n.startswith("runtime/models/") and n.endswith(".onnx")]
    assert onnx and all(p in names for p in PACKAGED)
    assert any(n.endswith("entry_points.txt") for n in names)
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "qgmrn = qgmrn.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    sdist = next(dist.glob("qgmrn-*.tar.gz"))
    held = {n.split("/", 1)[1] for n in tarfile.open(sdist).getnames() if "/" in n}
    assert all(p in held for p in PACKAGED) and "pyproject.toml" in held


@pytest.mark.slow
def test_the_installed_wheel_answers_without_torch(env, tmp_path):
    code = ("import sys, json, runtime, importlib.resources as r\n"
            "root = r.files('runtime')\n"
            "ex = json.loads((root / 'examples' / 'examples.json').read_text())\n"
            "card = json.loads((root / 'models' / 'builtin.json').read_text())\n"
            "img = root / 'examples' / 'scene1.png'\n"
            "a = runtime.answer(str(img), 'How many objects are there?')\n"
            "print(json.dumps({'answer': a, 'torch': 'torch' in sys.modules, 'file': runtime.__file__,"
            " 'examples': len(ex), 'card': sorted(card)[:3]}))\n")
    done = _run(env, "python", "-c", code, cwd=tmp_path)          # cwd outside the checkout
    assert done.returncode == 0, done.stderr[-2000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["answer"] and got["torch"] is False and got["examples"] > 0 and got["card"]
    assert str(env) in got["file"]                                  # the wheel's copy, not the checkout
    assert _run(env, "python", "-c", "import torch", cwd=tmp_path).returncode != 0

    answered = _run(env, "qgmrn", "answer", str(REPO / "runtime" / "examples" / "scene1.png"),
                    "Are there any cubes?", cwd=tmp_path)
    assert answered.returncode == 0 and answered.stdout.strip() in ("yes", "no"), answered.stderr
    version = _run(env, "qgmrn", "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("qgmrn ") and "torch" not in version.stdout
    train = _run(env, "qgmrn", "train", cwd=tmp_path)
    assert train.returncode == 2 and train.stderr.strip().splitlines() == [
        "error: qgmrn train needs torch, which is not installed: pip install torch==2.13.0 && pip install -e '.[train]'"]


@pytest.mark.slow
def test_qgmrn_serve_from_the_wheel_answers_over_http(env, tmp_path):
    port = _free_port()
    server = subprocess.Popen([str(env / "bin" / "qgmrn"), "serve", "--port", str(port)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(url + "/healthz", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert server.poll() is None, server.stderr.read()
            assert time.time() < deadline, "the server did not come up"
            time.sleep(0.5)
        image = (REPO / "runtime" / "examples" / "scene1.png").read_bytes()
        body = json.dumps({"image": base64.b64encode(image).decode(), "question": "Are there any cubes?"}).encode()
        req = urllib.request.Request(url + "/answer", body, {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            reply = json.loads(r.read())
        assert reply["answer"] in ("yes", "no")
    finally:
        server.terminate()
        server.wait(60)
