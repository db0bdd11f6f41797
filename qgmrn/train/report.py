"""Progress lines, the tqdm bar and metrics.jsonl: how a run reports while it trains."""
from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from .run import Run


class Reporter:
    """metrics.jsonl, the tqdm bar on a terminal, and a plain progress line every ~30 s elsewhere
    (logs, CI, nohup)."""

    def __init__(self, run: Run, path: Path, ckpt_path: Path, say):
        self.run, self.say, self.ckpt_path = run, say, ckpt_path
        self.file = open(path, "a") if run.main else None
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


def _hms(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}h{s // 60 % 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


