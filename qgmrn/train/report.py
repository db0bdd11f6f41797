"""Progress lines, the tqdm bar and metrics.jsonl: how a run reports while it trains."""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from ..files import append_no_link, atomic_file
from .run import Run


class Reporter:
    """metrics.jsonl, the tqdm bar on a terminal, and a plain progress line every ~30 s elsewhere
    (logs, CI, nohup)."""

    def __init__(self, run: Run, path: Path, ckpt_path: Path, say):
        self.run, self.say, self.ckpt_path = run, say, ckpt_path
        self.file = append_no_link(path) if run.main else None
        self.path = path
        self.tb = _tensorboard(path.parent) if run.main else None
        self.drawing = run.main
        self.bar = None
        self.plain = run.main and not sys.stderr.isatty()
        if run.main and not self.plain:
            from tqdm import tqdm
            self.bar = tqdm(total=run.total, initial=run.step, desc="train", unit="step", dynamic_ncols=True,
                            file=sys.stderr)
        self.last_line = time.monotonic()
        self.latest: dict = {}
        self.start_step = run.step
        self.t_start = time.monotonic()

    def write(self, rec: dict) -> None:
        if self.file is not None:
            self.file.write(json.dumps(rec) + "\n")
            self.file.flush()
        if self.tb is not None:
            for key, value in _scalars(rec):
                self.tb.add_scalar(key, value, rec["step"])
            self.tb.flush()

    def draw(self) -> None:
        """curves.png beside metrics.jsonl (the `plots` extra); skipped quietly without matplotlib,
        and a figure that cannot be drawn never stops the run (said once)."""
        if not self.drawing:
            return
        try:
            drawn = draw_curves(self.path, self.path.parent / "curves.png")
        except Exception as e:                      # a plot must never cost a training run
            self.say(f"note: curves.png not drawn ({type(e).__name__}: {e}); training goes on")
            drawn = False
        self.drawing = drawn

    def step_done(self, rec: dict | None) -> None:
        run = self.run
        if rec is not None:
            self.latest = rec
            self.write(rec)
            if self.bar is not None:
                self.bar.set_postfix(loss=f"{rec['loss']:.3f}", acc=f"{rec['acc']:.3f}", lr=f"{rec['lr']:.1e}",
                                     exec=f"{rec['exec_ratio']:.2f}", sps=f"{rec['samples_per_s']:.0f}")
        if self.bar is not None:
            self.bar.update(1)
        elif self.plain and time.monotonic() - self.last_line >= run.cfg.progress_every and self.latest:
            self.last_line = time.monotonic()
            done = run.step - self.start_step
            rate = done / max(1e-9, time.monotonic() - self.t_start)
            eta = (run.total - run.step) / max(rate, 1e-9)
            r = self.latest
            print(f"step {run.step}/{run.total} ({100 * run.step / run.total:.1f}%)  loss {r['loss']:.3f}  "
                  f"acc {r['acc']:.3f}  {r['samples_per_s']:.0f} samples/s  ETA {_hms(eta)}",
                  file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.file is not None:
            self.file.close()
        if self.tb is not None:
            self.tb.close()


def _tensorboard(folder: Path):
    """A SummaryWriter into the run folder where tensorboard is installed, else None."""
    import importlib.util
    if importlib.util.find_spec("tensorboard") is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
        return SummaryWriter(log_dir=str(folder / "tensorboard"))
    except Exception:                               # a broken tensorboard install: JSON lines only
        return None


def _scalars(rec: dict):
    """(tag, value) pairs of a metrics.jsonl record, for TensorBoard."""
    if rec.get("split") == "val":
        yield "val/overall", rec["overall"]
        for t, v in rec.get("per_type", {}).items():
            yield f"val/{t}", v
        use = rec.get("routing") or {}
        if "filters_executed" in use:
            yield "routing/filters_executed", use["filters_executed"]
            for i, v in enumerate(use["per_layer_executed"]):
                yield f"routing/layer{i + 1}", v
            if use.get("differ_same_image") is not None:
                yield "routing/differ_same_image", use["differ_same_image"]
        return
    for key in ("loss", "acc", "exec_ratio", "load_loss", "lr", "samples_per_s", "scene_loss", "where_loss"):
        if key in rec:
            yield f"train/{key}", rec[key]


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """(training records, val records) of a metrics.jsonl; a torn last line is skipped."""
    train, val = [], []
    for line in Path(path).read_text().splitlines():
        try:
            rec = json.loads(line)
        except ValueError:
            continue
        (val if rec.get("split") == "val" else train).append(rec)
    return train, val


def draw_curves(metrics: Path, png: Path) -> bool:
    """Training loss, val accuracy per question type and filters executed per layer against
    samples seen, as one PNG (as Ultralytics' results.png). False when matplotlib is missing."""
    import importlib.util
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train, val = read_metrics(metrics)
    fig, ax = plt.subplots(1, 3, figsize=(13, 3.6))
    if train:
        per_step = val[0]["samples"] / max(1, val[0]["step"]) if val else None
        xs = [r["step"] * per_step if per_step else r["step"] for r in train]
        ax[0].plot(xs, [r["loss"] for r in train], lw=1)
        ax[0].set_xlabel("samples" if per_step else "step")
    ax[0].set_ylabel("training loss")
    if val:
        xs = [r["samples"] for r in val]
        ax[1].plot(xs, [r["overall"] for r in val], "k-", lw=2, label="overall")
        for t in val[-1].get("per_type", {}):
            ax[1].plot(xs, [r.get("per_type", {}).get(t, float("nan")) for r in val], lw=1, label=t)
        ax[1].set_ylim(0, 1)
        ax[1].legend(fontsize=7)
        routed = [r for r in val if "filters_executed" in (r.get("routing") or {})]
        if routed:
            rx = [r["samples"] for r in routed]
            for l in range(len(routed[-1]["routing"]["per_layer_executed"])):
                ax[2].plot(rx, [r["routing"]["per_layer_executed"][l] for r in routed], lw=1, label=f"layer {l + 1}")
            ax[2].plot(rx, [r["routing"]["differ_same_image"] or 0.0 for r in routed], "k--", lw=1,
                       label="differ, same image")
            ax[2].set_ylim(0, 1.02)
            ax[2].legend(fontsize=7)
    ax[1].set_xlabel("samples"), ax[1].set_ylabel("val accuracy")
    ax[2].set_xlabel("samples"), ax[2].set_ylabel("filters executed (val)")
    fig.tight_layout()
    with atomic_file(png, binary=True) as f:
        fig.savefig(f, dpi=90, format="png")
    plt.close(fig)
    return True


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


