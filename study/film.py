"""FiLM (Perez et al. 2018), the peer of the paper's Table 1, sized to QGMRN-small's multiply-adds
and trained on the same data, samples and schedule: it tells the data from the model in the
learning study. Not part of the product.

    python study/film.py --data-root DIR --out runs/film --steps 20000 [--width 36] [--bf16]
    python study/film.py --jsonl TRAIN VAL --out runs/film ...        # JSON lines, as the trainer

Model: a GRU reads the question (QGMRN-small's sizes); a stem (two 3x3/2 convs) turns the 64x64
image into a 16x16 map; four residual blocks, each 1x1 conv on the map plus two coordinate
channels, 3x3 conv, batch norm without affine, then FiLM (per-channel gamma and beta from the
question) and ReLU; a 1x1 conv, global max pooling and an MLP answer. Writes metrics.jsonl rows in
the trainer's format (val rows with samples, training seconds and per-type accuracy), so
`study/learning_study.py report` draws FiLM's curves beside QGMRN's.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout

from qgmrn.data.datasets import VQADataset, collate  # noqa: E402
from qgmrn.data.prepare import cache_name, default_cache_dir, open_cache  # noqa: E402
from qgmrn.data.sources import answer_list, load_clevr, load_jsonl  # noqa: E402
from qgmrn.evaluate import summarize, within_limit  # noqa: E402
from qgmrn.model import conv_linear_macs, count_macs, create_model  # noqa: E402
from qgmrn.preprocess import Vocab  # noqa: E402


class FiLMBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.proj = nn.Conv2d(width + 2, width, 1)
        self.conv = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.norm = nn.BatchNorm2d(width, affine=False)

    def forward(self, x, coords, gamma, beta):          # x (B, C, H, W); gamma, beta (B, C)
        h = F.relu(self.proj(torch.cat([x, coords], 1)))
        y = self.norm(self.conv(h))
        y = F.relu(gamma[:, :, None, None] * y + beta[:, :, None, None])
        return h + y


class FiLM(nn.Module):
    def __init__(self, vocab_size: int, num_answers: int, width: int = 36, blocks: int = 4,
                 embed_dim: int = 64, hidden_dim: int = 128, head_dim: int = 128, mlp_dim: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        self.film = nn.Linear(hidden_dim, 2 * width * blocks)        # gamma and beta of every block
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, 2, 1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(FiLMBlock(width) for _ in range(blocks))
        self.head = nn.Sequential(nn.Conv2d(width + 2, head_dim, 1), nn.BatchNorm2d(head_dim), nn.ReLU())
        self.mlp = nn.Sequential(nn.Linear(head_dim, mlp_dim), nn.ReLU(), nn.Linear(mlp_dim, num_answers))
        self.width = width

    def encode_question(self, tokens, lengths):         # tokens (B, T) -> (B, hidden)
        packed = nn.utils.rnn.pack_padded_sequence(self.embed(tokens), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        return self.gru(packed)[1][-1]

    def forward(self, image, tokens, lengths):          # -> logits (B, answers)
        q = self.encode_question(tokens, lengths)
        gb = self.film(q).view(q.shape[0], len(self.blocks), 2, self.width)
        x = self.stem(image)
        b, _, h, w = x.shape
        ys, xs = torch.meshgrid(torch.linspace(-1, 1, h, device=x.device), torch.linspace(-1, 1, w, device=x.device),
                                indexing="ij")
        coords = torch.stack([xs, ys]).expand(b, 2, h, w).to(x.dtype)
        for k, block in enumerate(self.blocks):
            x = block(x, coords, 1 + gb[:, k, 0], gb[:, k, 1])     # gamma around 1 at the start
        x = self.head(torch.cat([x, coords], 1))
        return self.mlp(x.amax(dim=(2, 3)))


def film_macs(model: FiLM, image_size: int = 64, question_length: int = 12) -> int:
    run = lambda: model(torch.zeros(1, 3, image_size, image_size), torch.ones(1, question_length, dtype=torch.long),  # noqa: E731
                        torch.tensor([question_length]))
    gru = 3 * (model.gru.input_size + model.gru.hidden_size) * model.gru.hidden_size * question_length
    return conv_linear_macs(model, run) + gru


def evaluate(model, dataset, device) -> dict:
    model.eval()
    preds = []
    with torch.no_grad():
        for image, tokens, lengths, _ in DataLoader(dataset, batch_size=256, collate_fn=collate):
            preds.append(model(image.to(device), tokens.to(device), lengths.to(device)).argmax(1).cpu())
    model.train()
    return summarize((torch.cat(preds) == dataset.labels).numpy(), dataset.samples)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--data-root", help="CLEVR v1.0 layout")
    src.add_argument("--jsonl", nargs=2, metavar=("TRAIN", "VAL"), help="JSON lines, as the trainer reads them")
    ap.add_argument("--out", required=True)
    ap.add_argument("--steps", type=int, default=20000)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=1e-3)            # QGMRN-small's CPU rate
    ap.add_argument("--warmup-steps", type=int, default=500)
    ap.add_argument("--width", type=int, default=36, help="36: about QGMRN-small's multiply-adds at 64 px")
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--eval-every", type=int, default=2000)
    ap.add_argument("--max-val", type=int, default=3000)
    ap.add_argument("--bf16", action="store_true", help="bf16 autocast for the training step")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    torch.manual_seed(a.seed)
    if a.jsonl:
        train_s, val_s = load_jsonl(a.jsonl[0]), load_jsonl(a.jsonl[1])
        where, names = Path(a.jsonl[0]).parent, (cache_name(a.jsonl[0]), cache_name(a.jsonl[1]))
    else:
        train_s, val_s = load_clevr(a.data_root, "train"), load_clevr(a.data_root, "val")
        where, names = a.data_root, ("train", "val")
    vocab, answers = Vocab.build(s.question for s in train_s), answer_list(train_s)
    val_s, _ = within_limit(val_s[:a.max_val], 64)
    cache_dir = default_cache_dir(where)
    train_ds = VQADataset(train_s, vocab, answers, a.image_size,
                          open_cache(cache_dir, names[0], a.image_size, [s.image for s in train_s], build=True))
    val_ds = VQADataset(val_s, vocab, answers, a.image_size,
                        open_cache(cache_dir, names[1], a.image_size, [s.image for s in val_s], build=True))
    model = FiLM(len(vocab), len(answers), a.width)
    peer = create_model("small", vocab_size=len(vocab), num_answers=len(answers))
    print(f"FiLM width {a.width}: {film_macs(model, a.image_size) / 1e6:.1f} M multiply-adds, "
          f"{sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters; QGMRN-small "
          f"{count_macs(peer) / 1e6:.1f} M, {sum(p.numel() for p in peer.parameters()) / 1e6:.2f} M", flush=True)
    opt = torch.optim.Adam(model.parameters(), lr=a.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, a.warmup_steps)))
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    log = open(out / "metrics.jsonl", "w")
    step, seconds, g = 0, 0.0, torch.Generator().manual_seed(a.seed)
    while step < a.steps:
        order = torch.randperm(len(train_ds), generator=g).tolist()
        loader = DataLoader(torch.utils.data.Subset(train_ds, order), batch_size=a.batch_size, collate_fn=collate,
                            drop_last=True)
        for image, tokens, lengths, labels in loader:
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=a.bf16):
                loss = F.cross_entropy(model(image, tokens, lengths).float(), labels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            seconds += time.perf_counter() - t
            if step % a.eval_every == 0 or step == a.steps:
                res = evaluate(model, val_ds, "cpu")
                row = {"step": step, "split": "val", "samples": step * a.batch_size, "train_seconds": round(seconds, 1),
                       "overall": res["overall"], "per_type": res["per_type"], "per_subtype": res["per_subtype"]}
                log.write(json.dumps(row) + "\n")
                log.flush()
                print(f"step {step}: val {res['overall']:.3f} " + " ".join(f"{k}={v:.3f}" for k, v in res["per_type"].items())
                      + f" ({seconds:.0f} s)", flush=True)
            if step >= a.steps:
                break
    (out / "config.json").write_text(json.dumps({"model": "film", **vars(a)}, indent=1))
    torch.save({"film": model.state_dict(), "width": a.width, "vocab": vocab.tokens, "answers": answers,
                "image_size": a.image_size, "step": step}, out / "film.pt")     # for study/cross_eval.py
    return 0


if __name__ == "__main__":
    sys.exit(main())
