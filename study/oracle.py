"""The routed stack on perfect perception (issue 52 part 1): decide, before building, whether QGMRN's
routed blocks learn CLEVR's programs when perception is solved, next to FiLM's blocks on the same
input. Each scene's objects are painted into the object map from its scene record
(study/oracle_data.py), so a step costs only the routed part; the arms are in study/oracle_models.py.

    python study/oracle.py train --data-root DIR --arm today --out runs/oracle/today [--samples 3000000]
    python study/oracle.py train ... --resume              # continue an interrupted run to --samples
    python study/oracle.py report runs/oracle/* [--md docs/learning/oracle/rows.md]

Val is scene-stratified (every val scene with all its questions); each evaluation writes one row
to OUT/metrics.jsonl: accuracy overall, per question type and per family (no relation /
relations / same-attribute / and-or), its standard error from the spread between val scenes, and
the routing's use (filters executed, gates differing between two questions about one image).
OUT/baselines.json holds the question-only and majority baselines on the same val.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from oracle_data import FAMILIES, Split, load_split  # noqa: E402
from oracle_models import ARMS, OracleNet  # noqa: E402
from qgmrn.data.programs import QUESTION_TYPES  # noqa: E402
from qgmrn.routing import load_balancing_loss, routing_use, target_rate_loss  # noqa: E402

WHERE_WEIGHT, COUNT_WEIGHT, EXEC_TARGET, LOAD_WEIGHT = 1.0, 0.1, 0.6, 0.01   # the built-in recipe's


def summarize(correct: np.ndarray, data) -> dict:
    """Accuracy overall, per type and per family, with the standard error over val scenes.
    data: a Split, or anything with its types, families and scene_of."""
    out: dict = {"n": int(len(correct)), "overall": float(correct.mean())}
    for key, labels, order in (("per_type", data.types, QUESTION_TYPES), ("per_family", data.families, FAMILIES)):
        hits, totals = defaultdict(int), defaultdict(int)
        for ok, t in zip(correct, labels):
            hits[t] += int(ok)
            totals[t] += 1
        out[key] = {t: hits[t] / totals[t] for t in order if totals[t]}
    per_scene = defaultdict(list)
    for ok, s in zip(correct, data.scene_of.tolist()):
        per_scene[s].append(ok)
    acc = np.array([np.mean(v) for v in per_scene.values()])
    out["scenes"], out["se"] = len(acc), float(acc.std(ddof=1) / math.sqrt(len(acc))) if len(acc) > 1 else 0.0
    return out


def baselines(train_records: list, val_records: list, val: Split) -> dict:
    """Question-only (the most common training answer for the same words, else for the same type)
    and majority (the most common training answer of the question's type) on val."""
    by_text, by_type = defaultdict(Counter), defaultdict(Counter)
    for (q, a, t) in train_records:
        by_text[q.lower()][a] += 1
        by_type[t][a] += 1
    text = np.array([(by_text.get(q.lower()) or by_type[t]).most_common(1)[0][0] == a for q, a, t in val_records])
    major = np.array([by_type[t].most_common(1)[0][0] == a for _, a, t in val_records])
    return {"question_only": summarize(text, val), "majority": summarize(major, val)}


def subset(data: Split, n: int) -> Split:
    """The first n questions (whole scenes: questions are stored scene by scene)."""
    import dataclasses
    keep = slice(0, min(n, len(data.labels)))
    return dataclasses.replace(data, scene_of=data.scene_of[keep], tokens=data.tokens[keep],
                               lengths=data.lengths[keep], labels=data.labels[keep], where=data.where[keep],
                               where_ok=data.where_ok[keep], counts=data.counts[keep], types=data.types[keep],
                               families=data.families[keep], images=data.images[keep], texts=data.texts[keep],
                               answers=data.answers[keep])


def evaluate(model: OracleNet, data: Split, batch: int = 1024) -> dict:
    model.eval()
    preds, gates = [], []
    with torch.no_grad():
        for i in range(0, len(data.labels), batch):
            sl = slice(i, i + batch)
            out = model(data.maps[data.scene_of[sl]], data.tokens[sl], data.lengths[sl])
            preds.append(out["logits"].argmax(1))
            if "gates" in out:
                gates.append(out["gates"])
    model.train()
    result = summarize((torch.cat(preds) == data.labels).numpy(), data)
    if gates:
        use = routing_use(torch.cat(gates).numpy(), model.layer_sizes, data.images, data.types)
        result["routing"] = {k: use[k] for k in ("filters_executed", "differ_same_image", "always_on", "modules")
                             if k in use}
    return result


def losses(model: OracleNet, out: dict, data: Split, idx: torch.Tensor) -> torch.Tensor:
    loss = F.cross_entropy(out["logits"], data.labels[idx])
    if "gates" not in out:
        return loss
    sel, ok = out["select"], data.where_ok[idx][:, :out["select"].shape[1]]
    if ok.any():
        bce = F.binary_cross_entropy_with_logits(sel, data.where[idx][:, :sel.shape[1]], reduction="none").mean(2)
        loss = loss + WHERE_WEIGHT * bce[ok].mean()
    if "mass" in out:
        counts = data.counts[idx]
        if (counts >= 0).any():
            loss = loss + COUNT_WEIGHT * F.smooth_l1_loss(out["mass"][counts >= 0, 0], counts[counts >= 0])
    sizes = model.layer_sizes
    return (loss + LOAD_WEIGHT * load_balancing_loss(out["gates"], sizes)
            + target_rate_loss(out["gates"], sizes, EXEC_TARGET))


def _save(path: Path, state: dict) -> None:
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def train(a) -> int:
    torch.set_num_threads(a.threads)
    root, out = Path(a.data_root), Path(a.out)
    ckpt = out / "ckpt.pt"
    if out.exists() and any(out.iterdir()) and not a.resume:
        print(f"error: {out} already holds a run; add --resume to continue it or choose another --out", file=sys.stderr)
        return 2
    if a.resume and not ckpt.exists():
        print(f"error: --resume: {ckpt} not found", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    train_d, vocab, answers = load_split(root, "train", a.map_size)
    val_d, _, _ = load_split(root, "val", a.map_size, vocab, answers)
    train_probe = subset(train_d, len(val_d.labels))        # train accuracy on as many questions as val
    print(f"data: {len(train_d.labels)} train / {len(val_d.labels)} val questions on {len(val_d.maps)} val scenes; "
          f"{100 * train_d.collisions:.1f}% of objects share a {a.map_size}x{a.map_size} cell; "
          f"loaded in {time.perf_counter() - t0:.0f} s", flush=True)
    torch.manual_seed(a.seed)
    model = OracleNet(a.arm, len(vocab), len(answers))
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    gen = torch.Generator().manual_seed(a.seed)
    step, seconds = 0, 0.0
    if a.resume:
        state = torch.load(ckpt, weights_only=True)         # a file from someone else never runs code
        if state["arm"] != a.arm or state["seed"] != a.seed:
            print(f"error: {ckpt} is arm {state['arm']} seed {state['seed']}, not {a.arm} seed {a.seed}", file=sys.stderr)
            return 2
        model.load_state_dict(state["model"])
        opt.load_state_dict(state["opt"])
        gen.set_state(state["gen"])
        torch.set_rng_state(state["rng"])
        step, seconds = state["step"], state["seconds"]
        order, pos = state["order"], state["pos"]
        rows = [r for r in (out / "metrics.jsonl").read_text().splitlines() if json.loads(r)["step"] <= step]
        (out / "metrics.jsonl").write_text("".join(r + "\n" for r in rows))
    else:
        (out / "baselines.json").write_text(json.dumps(
            baselines(train_d.records(), val_d.records(), val_d), indent=1))
    params = sum(p.numel() for p in model.parameters())
    print(f"arm {a.arm} ({ARMS[a.arm]}): {params / 1e6:.2f} M parameters; from step {step}", flush=True)
    steps = a.samples // a.batch_size
    every = max(1, a.eval_every // a.batch_size)
    n = len(train_d.labels)
    if not a.resume:
        order, pos = torch.randperm(n, generator=gen), 0
    with open(out / "metrics.jsonl", "a") as log:
        while step < steps:
            if pos + a.batch_size > n:
                order, pos = torch.randperm(n, generator=gen), 0
            idx = order[pos:pos + a.batch_size]
            pos += a.batch_size
            t = time.perf_counter()
            for g in opt.param_groups:
                g["lr"] = a.lr * min(1.0, (step + 1) / a.warmup)
            out_ = model(train_d.maps[train_d.scene_of[idx]], train_d.tokens[idx], train_d.lengths[idx])
            loss = losses(model, out_, train_d, idx)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            seconds += time.perf_counter() - t
            step += 1
            if step % every == 0 or step == steps:
                row = {"step": step, "samples": step * a.batch_size, "seconds": round(seconds, 1),
                       "loss": loss.item(), **evaluate(model, val_d),
                       "train": evaluate(model, train_probe)["overall"]}
                log.write(json.dumps(row) + "\n")
                log.flush()
                use = row.get("routing", {})
                print(f"{row['samples']:>9} samples {seconds / 60:6.1f} min  train {100 * row['train']:5.1f} "
                      f"val {100 * row['overall']:5.1f} "
                      f"+-{100 * row['se']:.1f}  " + " ".join(f"{k[:8]} {100 * v:4.1f}" for k, v in row["per_family"].items())
                      + (f"  executed {100 * use['filters_executed']:.0f}% differ {100 * use['differ_same_image']:.0f}%"
                         if use else ""), flush=True)
                _save(ckpt, {"arm": a.arm, "seed": a.seed, "model": model.state_dict(), "opt": opt.state_dict(),
                             "gen": gen.get_state(), "rng": torch.get_rng_state(), "order": order, "pos": pos,
                             "step": step,
                             "seconds": seconds, "args": vars(a)})
    return 0


def _pct(x) -> str:
    return "" if x is None else f"{100 * x:.1f}"


def _row(name: str, r: dict, samples: str = "", minutes: str = "") -> str:
    use = r.get("routing") or {}
    cells = [name, samples, minutes, _pct(r.get("train")), _pct(r["overall"]), _pct(r["se"]),
             *(_pct(r["per_family"].get(f)) for f in FAMILIES), *(_pct(r["per_type"].get(t)) for t in QUESTION_TYPES),
             f"{100 * use['filters_executed']:.0f}%" if use else "", f"{100 * use['differ_same_image']:.0f}%" if use else ""]
    return "| " + " | ".join(cells) + " |"


def report(a) -> int:
    """Rows per run at milestones and its last evaluation, and the baselines on the same val."""
    head = ["run", "samples", "minutes", "train", "val", "+-", *FAMILIES, *QUESTION_TYPES, "executed", "differ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base_rows: dict = {}
    for run in map(Path, a.runs):
        rows = [json.loads(r) for r in (run / "metrics.jsonl").read_text().splitlines() if r.strip()]
        if (run / "baselines.json").exists():
            base_rows.update(json.loads((run / "baselines.json").read_text()))
        marks = [m for m in a.milestones if rows and m <= rows[-1]["samples"]]
        picked = {id(r): r for r in [min(rows, key=lambda r: abs(r["samples"] - m)) for m in marks] + rows[-1:]}
        for r in sorted(picked.values(), key=lambda r: r["samples"]):
            lines.append(_row(run.name, r, f"{r['samples'] / 1e6:.2f} M", f"{r['seconds'] / 60:.0f}"))
    for name, b in sorted(base_rows.items()):
        lines.append(_row(f"({name.replace('_', '-')} baseline)", b))
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if a.md:
        Path(a.md).parent.mkdir(parents=True, exist_ok=True)
        Path(a.md).write_text(text)
    return 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train one arm on painted scenes")
    t.add_argument("--data-root", required=True, help="CLEVR layout with scene records and programs")
    t.add_argument("--arm", choices=sorted(ARMS), required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--samples", type=int, default=3_000_000)
    t.add_argument("--batch-size", type=int, default=64)
    t.add_argument("--lr", type=float, default=1e-3)
    t.add_argument("--warmup", type=int, default=500, help="linear warm-up steps")
    t.add_argument("--map-size", type=int, default=8, help="the object map's side (small-frn's is 8)")
    t.add_argument("--eval-every", type=int, default=128_000, help="samples between evaluations")
    t.add_argument("--threads", type=int, default=1)
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--resume", action="store_true")
    r = sub.add_parser("report", help="tables of finished or running arms")
    r.add_argument("runs", nargs="+")
    r.add_argument("--milestones", type=lambda s: [int(float(x)) for x in s.split(",")],
                   default=[512_000, 1_024_000, 2_048_000, 3_000_000])
    r.add_argument("--md")
    a = ap.parse_args(argv)
    return train(a) if a.command == "train" else report(a)


if __name__ == "__main__":
    sys.exit(main())
