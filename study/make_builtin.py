"""Ship a trained checkpoint as the runtime's built-in model, with the numbers of its model card.

    python study/make_builtin.py runs/looks/ckpt.pt [--val-root DIR] [--dest runtime/models]

1. exports the checkpoint (fp32 ONNX, parity against PyTorch on the generated val images and on
   the real CLEVR sample) into a temporary bundle;
2. evaluates the checkpoint on the held-apart generated val split it never trained on (per type,
   per subtype, execution ratio per layer) and on the real CLEVR renders in ../shared/data;
3. answers a small fixed sample (the real CLEVR val questions and a generated set from a seed of
   its own) through the torch-free runtime and records how many it gets right: the tests pin that;
4. copies model.onnx to DEST/builtin.onnx and writes DEST/builtin.json (the card's numbers).
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
REAL_SAMPLE = REPO.parent / "shared" / "data" / "clevr-real-sample"
PINNED_SEED = 4242            # the generated pinned sample: its own seed, CLEVR's 3-10 objects
PINNED_IMAGES = 20


def pinned_generated(root: Path) -> Path:
    from qgmrn.data.generate import generate
    generate(root, images=1, val_images=PINNED_IMAGES, questions=10, seed=PINNED_SEED, workers=1,
             log=lambda *a: None)
    return root


def check_recipe(path: Path, state: dict) -> str:
    """The recipe's training settings must be the checkpoint's (paths and reporting aside)."""
    from export.onnx_export import TRAINING_KEYS
    from qgmrn.train import TrainConfig
    recipe = json.loads(path.read_text())
    saved = state["train_config"]
    defaults = TrainConfig()
    for key in TRAINING_KEYS:
        if key in ("recipe", "generate_images"):
            continue
        want = recipe.get(key, getattr(defaults, key))
        if key in ("lr", "epochs") and want is None:
            continue                                   # resolved by the trainer (lr from the preset, epochs 10 or 6)
        trained = saved.get(key, getattr(defaults, key))        # older checkpoints lack newer fields
        if trained != want:
            raise SystemExit(f"error: {path} sets {key}={want!r} but the checkpoint was trained with {trained!r}")
    return path.name


PATH_KEYS = ("data_root", "out", "cache_dir")


def without_paths(train_config: dict) -> dict:
    """The training settings as the card shows them: folders by their name only (the training
    machine's absolute paths say nothing to a reader and leak where it ran)."""
    out = dict(train_config)
    for key in PATH_KEYS:
        if out.get(key):
            out[key] = Path(out[key]).name
    for key in ("jsonl", "humans"):
        if out.get(key):
            out[key] = [Path(p).name for p in out[key]]
    return out


def data_description(root) -> dict:
    """What the held-apart split is: the generator's settings from its scenes file."""
    info = json.loads((Path(root) / "scenes" / "CLEVR_val_scenes.json").read_text()).get("info", {})
    return {"name": Path(root).name, **{k: info[k] for k in ("generator", "renderer", "size", "samples", "seed",
                                                             "objects") if k in info}}


def runtime_score(onnx_path: Path, samples) -> dict:
    import runtime
    model = runtime.load(onnx_path, backend="cpu")
    got = model.answer_batch([s.image for s in samples], [s.question for s in samples])
    return {"n": len(samples), "correct": sum(g == s.answer for g, s in zip(got, samples))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--val-root", help="CLEVR-layout data whose val split is the card's held-apart set "
                                       "(default: the data the checkpoint trained on)")
    ap.add_argument("--dest", default=str(REPO / "runtime" / "models"))
    ap.add_argument("--recipe", help="the recipe (config file) the run followed; checked against the "
                                     "checkpoint's settings and recorded in the metadata")
    a = ap.parse_args(argv)
    from export.bundle import export_checkpoint
    from qgmrn.checkpoint import load_checkpoint, model_from_checkpoint
    from qgmrn.data.sources import load_clevr
    from qgmrn.evaluate import build_eval_dataset, evaluate_model, public

    state = load_checkpoint(a.checkpoint)
    recipe = None
    if a.recipe:
        recipe = check_recipe(Path(a.recipe), state)
    val_root = a.val_root or state["train_config"].get("data_root")
    model = model_from_checkpoint(state).eval()
    card: dict = {"checkpoint": Path(a.checkpoint).name, "train_config": without_paths(state["train_config"]),
                  "model_config": state["model_config"], "train_steps": state["step"],
                  "train_seconds": state.get("train_seconds"), "parameters": sum(p.numel() for p in model.parameters())}
    from qgmrn.data.sources import majority_baseline, question_only_baseline
    train_s, val_s = load_clevr(val_root, "train"), load_clevr(val_root, "val")
    card["baselines"] = {"majority": majority_baseline(train_s, val_s), "question_only": question_only_baseline(train_s, val_s)}
    for name, root in (("generated_val", val_root), ("real_clevr_val", REAL_SAMPLE)):
        dataset = build_eval_dataset(state, root, None, "val")
        card[name] = public(evaluate_model(model, dataset, 256, "cpu"))
        card[name]["data"] = Path(root).name
        print(f"{name}: {card[name]['overall']:.3f} on {card[name]['n']} questions", flush=True)
    # the whole real sample (both splits, 340 questions): none of it was trained on
    from qgmrn.data.datasets import VQADataset
    from qgmrn.preprocess import Vocab
    real_all = load_clevr(REAL_SAMPLE, "train") + load_clevr(REAL_SAMPLE, "val")
    dataset = VQADataset(real_all, Vocab(list(state["vocab"])), list(state["answers"]), model.cfg.image_size)
    card["real_clevr_all"] = {**public(evaluate_model(model, dataset, 256, "cpu")), "data": REAL_SAMPLE.name}
    majority = majority_baseline(train_s, real_all)["per_type_majority"]
    counts = {t: sum(s.qtype == t for s in real_all) for t in majority}
    card["baselines"]["majority_real_sample"] = {      # each type's most common training answer
        "per_type_majority": majority, "overall": sum(majority[t] * counts[t] for t in majority) / len(real_all)}
    print(f"real_clevr_all: {card['real_clevr_all']['overall']:.3f} on {card['real_clevr_all']['n']} questions")
    card["data"] = data_description(val_root)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        gen = pinned_generated(tmp / "pinned")
        staged = export_checkpoint(a.checkpoint, tmp / "bundle", data_root=str(val_root), parity_n=300,
                                   extra_samples=load_clevr(REAL_SAMPLE, "val"), log=print, recipe=recipe)
        card["parity"] = staged.report["artefacts"]["onnx-fp32"]
        card["parity_inputs"] = (staged.report["inputs"].replace(str(val_root), Path(val_root).name)
                                 + " + the real CLEVR sample's val questions")
        onnx_path = staged.stage / "model.onnx"
        card["pinned"] = {"real_clevr_val": runtime_score(onnx_path, load_clevr(REAL_SAMPLE, "val")),
                          "generated": {**runtime_score(onnx_path, load_clevr(gen, "val")),
                                        "seed": PINNED_SEED, "images": PINNED_IMAGES}}
        card["bytes"] = onnx_path.stat().st_size
        dest = Path(a.dest)
        dest.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(onnx_path, dest / "builtin.onnx")
        shutil.rmtree(staged.stage, ignore_errors=True)
    from export.onnx_export import read_metadata
    meta = read_metadata(str(dest / "builtin.onnx"))
    card["checkpoint_sha256"] = meta["checkpoint_sha256"]
    card["recipe"] = meta.get("recipe")
    (dest / "builtin.json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps({k: card[k] for k in ("bytes", "pinned", "recipe", "checkpoint_sha256")}, indent=1))
    print(f"wrote {dest / 'builtin.onnx'} and {dest / 'builtin.json'}")
    print(card_markdown(card))
    return 0


TITLES = {"count": "Count", "exist": "Exist", "compare_numbers": "Compare Numbers",
          "query_attribute": "Query Attribute", "compare_attribute": "Compare Attribute"}


def card_markdown(card: dict) -> str:
    """The model card's tables, from builtin.json."""
    from qgmrn.routing import format_routing_use
    g, r = card["generated_val"], card["real_clevr_val"]
    types = [t for t in TITLES if t in g["per_type"]]
    lines = ["| split | questions | Overall | " + " | ".join(TITLES[t] for t in types) + " |",
             "|---|---|---|" + "---|" * len(types)]
    kind = (card.get("data") or {}).get("renderer", "generated")
    rows = [(f"{kind} val (held apart)", g), ("real CLEVR val sample", r)]
    if "real_clevr_all" in card:
        rows.append(("real CLEVR sample, both splits", card["real_clevr_all"]))
    for name, res in rows:
        lines.append(f"| {name} | {res['n']} | {100 * res['overall']:.1f} | "
                     + " | ".join(f"{100 * res['per_type'][t]:.1f}" if t in res["per_type"] else "-" for t in types) + " |")
    b = card.get("baselines")
    if b:
        m, q = b["majority"], b["question_only"]
        lines.append("| majority answer per type (generated val) | - | " + f"{100 * m['overall']:.1f} (one answer) | "
                     + " | ".join(f"{100 * m['per_type_majority'].get(t, 0):.1f}" for t in types) + " |")
        lines.append("| question only (generated val) | - | " + f"{100 * q['overall']:.1f} | "
                     + " | ".join(f"{100 * q['per_type'].get(t, 0):.1f}" for t in types) + " |")
        mr = b.get("majority_real_sample")
        if mr:
            lines.append("| majority answer per type (real sample, both splits) | - | " + f"{100 * mr['overall']:.1f} | "
                         + " | ".join(f"{100 * mr['per_type_majority'].get(t, 0):.1f}" for t in types) + " |")
    subs = list(g["per_subtype"])
    lines += ["", "| subtype | " + " | ".join(subs) + " |", "|---|" + "---|" * len(subs),
              "| generated val | " + " | ".join(f"{100 * g['per_subtype'][s]:.1f}" for s in subs) + " |"]
    rt = g["routing"]
    lines += ["", f"Execution ratio (generated val): overall {rt['overall_execution_ratio']:.3f}; per layer "
              + ", ".join(f"{p['mean']:.2f} [{p['q1']:.2f}, {p['q3']:.2f}]" for p in rt["per_layer"]) + " (mean [q1, q3])"]
    for name, res in rows:                             # how much the routing carries the question
        use = res.get("routing", {}).get("use")
        if use and "filters_executed" in use:
            per_type = ", ".join(f"{TITLES.get(t, t).lower()} {100 * x:.0f}%" for t, x in use["per_type_executed"].items())
            lines += ["", f"Routing use ({name}, {use['questions']} questions): {format_routing_use(use).removeprefix('routing: ')}"
                      + (f"; filters executed per question type: {per_type}" if per_type else "")]
    p = card["parity"]
    lines += ["", f"Parity (fp32 ONNX vs PyTorch, {p['samples']} questions: {card['parity_inputs']}): "
              f"max |logit diff| {p['max_abs_logit_diff']:.1e}, top-1 {100 * p['top1_agreement']:.1f}%, gates "
              f"{100 * p['gate_agreement']:.2f}% identical ({p['route_logits_within_eps']} route logits within "
              f"{p['eps']:g} of the threshold). File: {card['bytes'] / 2**20:.2f} MiB, {card['parameters'] / 1e6:.2f} M "
              f"parameters, checkpoint sha256 {card['checkpoint_sha256'][:16]}..."]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
