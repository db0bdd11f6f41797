"""The oracle study's tools (study/oracle*.py, issue 52 part 1): each scene's objects are painted
into the object map at their cells with their attributes, a comparison keeps its two sides'
objects apart, and a tiny run of every arm trains, evaluates scene-stratified val and resumes to
the same numbers as an uninterrupted run."""
import importlib
import json
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "study"))


def _module(name):
    return importlib.import_module(name)             # study/ is on the path: its modules import each other


def test_objects_are_painted_at_their_cells_with_their_attributes():
    paint = _module("oracle_data").paint
    rows = np.full((1, 10, 6), -1.0, np.float32)
    rows[0, 0] = [0.10, 0.90, 1, 2, 0, 1]          # x, y, colour red, shape cylinder, size large, metal
    rows[0, 1] = [0.95, 0.05, 7, 0, 1, 0]          # yellow cube, small, rubber
    maps, collisions = paint(rows, 8, 8)
    assert collisions == 0.0 and maps.shape == (1, 16, 8, 8)
    assert maps[0, :, 7, 0].nonzero()[0].tolist() == [1, 8 + 2, 11 + 0, 13 + 1, 15]
    assert maps[0, :, 0, 7].nonzero()[0].tolist() == [7, 8 + 0, 11 + 1, 13 + 0, 15]
    assert maps[0].sum() == 10                      # nothing anywhere else


def test_a_comparison_keeps_its_two_sides_apart():
    data = _module("oracle_data")
    scene = {"objects": [{"color": "red", "shape": "cube", "size": "large", "material": "metal"},
                         {"color": "blue", "shape": "cube", "size": "small", "material": "rubber"},
                         {"color": "red", "shape": "sphere", "size": "small", "material": "rubber"}],
             "relationships": {r: [[], [], []] for r in ("left", "right", "front", "behind")}}
    program = [{"function": "scene", "inputs": [], "value_inputs": []},
               {"function": "filter_shape", "inputs": [0], "value_inputs": ["cube"]},
               {"function": "count", "inputs": [1], "value_inputs": []},
               {"function": "scene", "inputs": [], "value_inputs": []},
               {"function": "filter_color", "inputs": [3], "value_inputs": ["red"]},
               {"function": "count", "inputs": [4], "value_inputs": []},
               {"function": "greater_than", "inputs": [2, 5], "value_inputs": []}]
    assert data.argument_objects(program, scene) == ([0, 1], [0, 2])
    assert data.argument_objects(program[:3], scene) == ([0, 1], None)
    assert data.family(program) == "no relation" and data.hops(program) == 0


@pytest.mark.parametrize("arm", ["today", "select", "deep", "film"])
def test_every_arm_trains_and_resumes_to_the_same_numbers(tiny_data, tmp_path, arm):
    oracle = _module("oracle")
    base = ["train", "--data-root", str(tiny_data), "--arm", arm, "--eval-every", "64", "--batch-size", "16"]
    assert oracle.main(base + ["--out", str(tmp_path / "a"), "--samples", "128"]) == 0
    assert oracle.main(base + ["--out", str(tmp_path / "b"), "--samples", "64"]) == 0
    assert oracle.main(base + ["--out", str(tmp_path / "b"), "--samples", "128", "--resume"]) == 0
    rows = {k: [json.loads(r) for r in (tmp_path / k / "metrics.jsonl").read_text().splitlines()] for k in "ab"}
    assert [r["samples"] for r in rows["a"]] == [64, 128] == [r["samples"] for r in rows["b"]]
    drop = lambda r: {k: v for k, v in r.items() if k != "seconds"}  # noqa: E731
    assert [drop(r) for r in rows["a"]] == [drop(r) for r in rows["b"]]
    last = rows["a"][-1]
    assert set(last["per_family"]) <= {"no relation", "relations", "same-attribute", "and-or"} and last["scenes"] == 8
    assert ("routing" in last) == (arm != "film")
    assert oracle.main(base + ["--out", str(tmp_path / "a"), "--samples", "128"]) == 2      # never replaces a run
    assert oracle.main(["report", str(tmp_path / "a"), "--md", str(tmp_path / "rows.md")]) == 0
    assert "(question-only baseline)" in (tmp_path / "rows.md").read_text()
