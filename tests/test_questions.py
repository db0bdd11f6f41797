"""Questions as CLEVR asks them (issue 48): the generator writes CLEVR's families, hops and program
lengths in about CLEVR's proportions, balances answers within each template and number of named
attributes (so the words alone do not tell the answer), and a blind model reads about as much from
its words as from real CLEVR's (the text-only check)."""
import importlib.util
import json
from collections import Counter

import pytest

from conftest import REPO
from qgmrn.data.generate import generate
from qgmrn.data.programs import named_attributes, program_subtype, question_type


def _module(name):
    spec = importlib.util.spec_from_file_location(name, REPO / "study" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def questions_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("questions-v3")
    generate(root, images=400, val_images=80, questions=10, seed=3, workers=1, log=lambda *a: None)
    return root


def _records(root, split="train"):
    return json.loads((root / "questions" / f"CLEVR_{split}_questions.json").read_text())["questions"]


def test_yes_is_as_likely_whatever_the_question_names(questions_data):
    exist, compare = {}, Counter()
    for r in _records(questions_data):
        sub = program_subtype(r["program"])
        if sub == "exist":
            exist.setdefault(min(named_attributes(r["program"]), 3), Counter())[r["answer"]] += 1
        elif question_type(sub) in ("compare_numbers", "compare_attribute"):
            compare[r["answer"]] += 1
    for named, c in exist.items():
        if sum(c.values()) >= 40:
            assert 0.4 <= c["yes"] / sum(c.values()) <= 0.6, (named, c)
    assert abs(compare["yes"] - compare["no"]) <= 0.05 * sum(compare.values()), compare


def test_families_hops_and_lengths_are_near_real_clevrs(questions_data, real_sample):
    stats = _module("question_stats").stats
    ours, real = stats(_records(questions_data)), stats(_records(real_sample) + _records(real_sample, "val"))
    for key in ("families", "types"):
        for name, share in real[key].items():
            assert abs(ours[key][name] - share) < 0.08, (key, name, ours[key][name], share)
    assert ours["hops"][3] > 0.03 and abs(ours["mean_steps"] - real["mean_steps"]) < 1.5


@pytest.mark.slow
def test_the_text_only_check_holds_on_a_small_generated_set(questions_data, real_sample):
    text_only = _module("text_only")
    result = text_only.check(questions_data, real_sample, steps=1500)
    gap = result["generated val"]["blind"]["overall"] - result["real sample"]["blind"]["overall"]
    assert gap <= 0.03, text_only.table(result)
    assert result["generated val"]["blind"]["overall"] > result["generated val"]["majority"]["overall"]
