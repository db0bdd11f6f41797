"""A new user's first hour (issue 50 part 2, the items a test can check): the README's example
lines run as written, `--example N` asks about a shipped scene, `--json | head` ends quietly,
predictions carry `score`, and the model object is callable."""
import os
import re
import subprocess
import sys

import runtime
from conftest import REPO

ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def test_the_readmes_python_example_runs_and_answers_as_it_says():
    block = re.search(r"```python\n(import runtime\n.*?)```", (REPO / "README.md").read_text(), re.S).group(1)
    lines = [line for line in block.splitlines() if line.strip()]
    env: dict = {}
    cwd = os.getcwd()
    os.chdir(REPO)
    try:
        for line in lines:
            code, _, comment = line.partition("#")
            if code.strip().startswith(("model.answer", "model(", "runtime.answer")):
                said = re.search(r'"([^"]+)"', comment).group(1)
                assert eval(code, env) == said, line
            else:
                exec(code, env)
    finally:
        os.chdir(cwd)


def test_an_example_scene_from_the_shell_and_a_pipe_that_closes_early():
    r = subprocess.run([sys.executable, "-m", "runtime", "--example", "2", "What is the shape of the big gray matte object?"],
                       capture_output=True, text=True, env=ENV, cwd=REPO)
    assert r.returncode == 0 and r.stdout.strip() == "cylinder", r.stderr
    read, write = os.pipe()
    os.close(read)                                   # the reader is gone before anything is written
    r = subprocess.run([sys.executable, "-m", "qgmrn.cli", "answer", "--example", "1", "Is there a cube?", "--json"],
                       stdout=write, stderr=subprocess.PIPE, text=True, env=ENV, cwd=REPO)
    os.close(write)
    assert r.returncode == 0 and "Traceback" not in r.stderr and "BrokenPipe" not in r.stderr, r.stderr
    r = subprocess.run([sys.executable, "-m", "runtime", "--example", "1"], capture_output=True, text=True, env=ENV)
    assert r.returncode == 2 and "give only the question" not in r.stderr and "error" in r.stderr


def test_predictions_carry_score_and_the_model_is_callable():
    model = runtime.load("builtin")
    image = str(REPO / "runtime" / "examples" / "scene1.png")
    d = model.predict(image, "Is there a brown shiny object?").to_dict()
    assert d["score"] == d["probability"] and all(t["score"] == t["probability"] for t in d["top_k"])
    assert model(image, "Is there a brown shiny object?") == model.answer(image, "Is there a brown shiny object?")
