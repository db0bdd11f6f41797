"""Data: generator, loaders for real CLEVR / CLEVR-Humans / JSON lines, cache, shared preprocessing."""
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from qgmrn.data.datasets import VQADataset, collate
from qgmrn.data.generate import generate
from qgmrn.data.prepare import ImageCache, prepare
from qgmrn.data.programs import SUBTYPES, execute
from qgmrn.data.questions import FAMILIES
from qgmrn.data.sources import DataError, answer_list, load_clevr, load_humans, load_jsonl
from qgmrn.preprocess import UNK_ID, ImageError, Vocab, encode_batch, preprocess_image


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    out = tmp_path_factory.mktemp("gen")
    generate(out, images=60, val_images=20, questions=10, seed=7, workers=2, log=lambda *a: None)
    return out


def test_real_clevr_loads_every_record_with_the_papers_types(real_sample):
    train, val = load_clevr(real_sample, "train"), load_clevr(real_sample, "val")
    assert (len(train), len(val)) == (240, 100)
    raw = json.loads((real_sample / "questions/CLEVR_val_questions.json").read_text())["questions"]
    for s, rec in zip(val, raw):
        last = rec["program"][-1]["function"]
        assert s.subtype == last and s.question == rec["question"] and s.answer == rec["answer"]
    types = {s.subtype: s.qtype for s in train + val}
    assert types == {"count": "count", "exist": "exist", "equal_integer": "compare_numbers",
                     "less_than": "compare_numbers", "greater_than": "compare_numbers",
                     "query_size": "query_attribute", "query_color": "query_attribute",
                     "query_material": "query_attribute", "query_shape": "query_attribute",
                     "equal_size": "compare_attribute", "equal_color": "compare_attribute",
                     "equal_material": "compare_attribute", "equal_shape": "compare_attribute"}
    assert set(types) == set(SUBTYPES)


def test_real_images_come_out_rgb_at_the_models_size(real_sample):
    val = load_clevr(real_sample, "val")
    vocab = Vocab.build(s.question for s in val)
    ds = VQADataset(val[:4], vocab, answer_list(val), image_size=64)
    image, tokens, lengths, labels = collate([ds[i] for i in range(4)])
    assert image.shape == (4, 3, 64, 64) and image.dtype == torch.float32
    assert tokens.shape[0] == 4 and (labels >= 0).all()


def test_training_and_runtime_preprocessing_are_identical(real_sample, tmp_path):
    val = load_clevr(real_sample, "val")[:5]
    vocab = Vocab.build(s.question for s in val)
    prepare([s.image for s in val], tmp_path, "val", 48, workers=1)
    decoded = VQADataset(val, vocab, answer_list(val), 48)
    cached = VQADataset(val, vocab, answer_list(val), 48, ImageCache.find(tmp_path, "val", 48))
    assert cached.cache is not None and decoded.cache is None
    for i, s in enumerate(val):
        runtime = preprocess_image(s.image, 48)
        assert np.array_equal(decoded[i][0].numpy(), runtime)
        assert np.array_equal(cached[i][0].numpy(), runtime)
        tokens, lengths, _ = encode_batch(vocab, [s.question])
        assert decoded[i][1].tolist() == tokens[0, :lengths[0]].tolist()


def test_clevr_humans_loads_and_maps_unknown_words_to_unk(real_sample):
    train = load_clevr(real_sample, "train")
    vocab = Vocab.build(s.question for s in train)
    humans = load_humans(real_sample / "humans/CLEVR-Humans-val.json", real_sample / "images/val")
    assert len(humans) == 14 and all(s.subtype is None for s in humans)
    unknown = [w for s in humans for w in vocab.encode(s.question)[1]]
    assert unknown, "CLEVR-Humans uses words that CLEVR does not"
    with_unknown = next(s.question for s in humans if vocab.encode(s.question)[1])
    ids, unk = vocab.encode(with_unknown)
    assert ids.count(UNK_ID) == len(unk) > 0
    before = list(vocab.tokens)
    added = vocab.extend(s.question for s in humans)
    assert vocab.tokens[:len(before)] == before and added and all(vocab.encode(s.question)[1] == [] for s in humans)


def test_generated_programs_give_their_answers_and_every_family_appears(generated):
    for split in ("train", "val"):
        qs = json.loads((generated / f"questions/CLEVR_{split}_questions.json").read_text())["questions"]
        scenes = json.loads((generated / f"scenes/CLEVR_{split}_scenes.json").read_text())["scenes"]
        for q in qs:
            assert execute(q["program"], scenes[q["image_index"]]) == q["answer"]
        assert {q["question_family_index"] for q in qs} == set(range(len(FAMILIES)))
    samples = load_clevr(generated, "train")
    assert {s.qtype for s in samples} == {"count", "exist", "compare_numbers", "query_attribute",
                                          "compare_attribute"}


def test_generated_questions_speak_real_clevrs_words(real_sample):
    """A model trained on generated questions reads real CLEVR's: every word of the real sample's
    questions (synonyms such as big/tiny/matte, "on the left side of", "either ... or", "its")
    is one the generator writes, asked of the same scenes."""
    import random
    from qgmrn.data.question_mix import AnswerBalancer, make_questions
    scenes = [s for split in ("train", "val")
              for s in json.loads((real_sample / f"scenes/CLEVR_{split}_scenes.json").read_text())["scenes"]]
    rng = random.Random(0)
    balancer, generated = AnswerBalancer(rng), []
    for k in range(20):                                      # the sample has only a few dozen scenes
        for i, scene in enumerate(scenes):
            for q in make_questions(scene, 10, rng, balancer, first_family=(i + k) * 10):
                assert execute(q["program"], scene) == q["answer"]
                generated.append(q["question"])
    vocab = Vocab.build(generated)
    real = load_clevr(real_sample, "train") + load_clevr(real_sample, "val")
    unknown = {w for s in real for w in vocab.encode(s.question)[1]}
    assert len(real) == 340 and not unknown, sorted(unknown)


def test_generated_layout_matches_clevr(generated):
    scene = json.loads((generated / "scenes/CLEVR_train_scenes.json").read_text())["scenes"][3]
    assert scene["image_filename"] == "CLEVR_train_000003.png"
    assert 3 <= len(scene["objects"]) <= 10 and set(scene["relationships"]) == {"left", "right", "front", "behind"}
    assert set(scene["objects"][0]) >= {"shape", "color", "size", "material", "3d_coords", "pixel_coords"}
    from PIL import Image
    with Image.open(generated / "images/train/CLEVR_train_000003.png") as im:
        assert im.mode == "RGBA" and im.size == (480, 320)


def test_same_seed_gives_byte_identical_output(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    generate(a, 12, 4, 5, seed=3, workers=1, log=lambda *x: None)
    generate(b, 12, 4, 5, seed=3, workers=2, log=lambda *x: None)
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file())
    assert files and files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file())
    assert all((a / f).read_bytes() == (b / f).read_bytes() for f in files)


def test_generated_answers_are_balanced_within_types(generated):
    samples = load_clevr(generated, "train") + load_clevr(generated, "val")
    for qtype in ("count", "query_attribute"):
        answers = Counter(s.answer for s in samples if s.qtype == qtype)
        assert answers.most_common(1)[0][1] / sum(answers.values()) < 0.45


def test_jsonl_own_data(tmp_path, real_sample):
    shutil.copy(real_sample / "images/val/CLEVR_val_000010.png", tmp_path / "a.png")
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"image": "a.png", "question": "What is it?", "answer": "cube"}) + "\n\n" +
        json.dumps({"image": "a.png", "question": "Is it red?", "answer": "no"}) + "\n")
    samples = load_jsonl(tmp_path / "train.jsonl")
    assert [s.answer for s in samples] == ["cube", "no"] and Path(samples[0].image).exists()


def test_bad_input_names_the_file_and_record(tmp_path, real_sample):
    (tmp_path / "bad.jsonl").write_text('{"image": "a.png", "question": "q?", "answer": "x"}\n{oops\n')
    with pytest.raises(DataError, match=r"bad.jsonl: line 2"):
        load_jsonl(tmp_path / "bad.jsonl")
    (tmp_path / "noans.jsonl").write_text('{"image": "a.png", "question": "q?"}\n')
    with pytest.raises(DataError, match=r"noans.jsonl: line 1: .*no answer"):
        load_jsonl(tmp_path / "noans.jsonl")
    (tmp_path / "missing.jsonl").write_text('{"image": "nope.png", "question": "q?", "answer": "x"}\n')
    with pytest.raises(DataError, match=r"missing.jsonl: 1 image\(s\) not found.*nope.png"):
        load_jsonl(tmp_path / "missing.jsonl")
    root = tmp_path / "clevr"
    (root / "questions").mkdir(parents=True)
    (root / "questions/CLEVR_train_questions.json").write_text('{"questions": [{"question": "x"')
    with pytest.raises(DataError, match="CLEVR_train_questions.json: not valid JSON"):
        load_clevr(root, "train")
    (root / "questions/CLEVR_train_questions.json").write_text('{"questions": [{"question": "x?"}]}')
    with pytest.raises(DataError, match="record 0: missing field 'image_filename'"):
        load_clevr(root, "train")
    (root / "questions/CLEVR_train_questions.json").write_text(
        '{"questions": [{"question": "x?", "image_filename": "a.png", "answer": "no", "type": 3}]}')
    with pytest.raises(DataError, match="record 0: field 'type' should be a string, got int"):
        load_clevr(root, "train")
    corrupt = tmp_path / "corrupt.png"
    corrupt.write_bytes((real_sample / "images/val/CLEVR_val_000010.png").read_bytes()[:300])
    with pytest.raises(ImageError, match="corrupt.png"):
        preprocess_image(corrupt, 32)


def test_objects_per_scene_follow_the_requested_range(tmp_path):
    generate(tmp_path, 10, 2, 2, seed=5, workers=1, log=lambda *a: None, objects=(3, 4))
    scenes = json.loads((tmp_path / "scenes/CLEVR_train_scenes.json").read_text())["scenes"]
    assert {len(s["objects"]) for s in scenes} <= {3, 4}
    with pytest.raises(ValueError, match="objects per scene"):
        generate(tmp_path / "x", 1, 1, 1, objects=(5, 11))
