"""The arms of the oracle study (study/oracle.py): what reads the painted scene map (16, h, w).

- "today": small-frn's two routed blocks at the object map (FilterBlock, 64 filters each, gated
  before the residual add) and its plain head (1x1 conv over [map, coordinates], global max pool,
  [., q] -> MLP), the where loss on a side channel the classifier never reads, and the training
  gate [t + l > 0] with full Logistic(0, 1) noise: the built-in model's network minus its stem.
- "select": the same blocks, a read-out that uses the selection and noise-free gates.
- "deep": eight routed blocks with the two coordinate maps into every block (FiLM's placement),
  the selection read-out and noise-free gates.
- "film": FiLM's blocks (study/film.py) on the same map, the peer known to take off on CLEVR.

Selection read-out: a sigmoid map per argument (two channels: two-argument questions compare two
sides) from the gated features, not from the question; the projected map pooled as a weighted
mean and a weighted sum under each channel, beside the paper's global max pool and each channel's
mass (how much is selected, which a count reads). The where loss trains the selection map; the
count loss reads the first channel's mass.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from film import FiLMBlock  # noqa: E402
from qgmrn.config import get_config  # noqa: E402
from qgmrn.model import PlainHead, TextEncoder, coord_maps  # noqa: E402
from qgmrn.visual import FilterBlock  # noqa: E402

ARMS = {
    # blocks, coordinates into every block, read-out, training-gate noise scale
    "today": dict(blocks=2, coords=False, readout="paper", noise=1.0),
    "select": dict(blocks=2, coords=False, readout="select", noise=0.0),
    "deep": dict(blocks=8, coords=True, readout="select", noise=0.0),
    "film": dict(blocks=4, coords=True, readout="film", noise=0.0),
}
WIDTH, EMBED, HIDDEN, HEAD, MLP = 64, 64, 128, 128, 256          # small-frn's sizes at the 8x8 map
ROUTE_BIAS = 0.8473                                               # log(0.7 / 0.3): paper appendix B


def st_gates(logits: torch.Tensor, noise: float, training: bool, tau: float = 1.0) -> torch.Tensor:
    """Binary gates forward, sigmoid gradients backward (paper alg. 1), with the logistic noise
    scaled by `noise` (1: the paper's Gumbel-sigmoid; 0: the test-time gate [l > 0] in training too)."""
    if not training:
        return (logits > 0).to(logits.dtype)
    t = logits
    if noise > 0:
        u = torch.rand_like(logits).clamp_(1e-6, 1 - 1e-6)
        t = logits + noise * (torch.log(u) - torch.log1p(-u))
    soft = torch.sigmoid(t / tau)
    return (soft > 0.5).to(soft.dtype) - soft.detach() + soft


class CoordBlock(nn.Module):
    """A routed residual block whose first conv also reads the two coordinate maps; the second
    conv's filters are gated before the residual add (the paper's FRN module)."""

    def __init__(self, width: int):
        super().__init__()
        self.conv1 = nn.Conv2d(width + 2, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(torch.cat([x, coord_maps(x)], 1))))
        out = self.bn2(self.conv2(out)) * gate[:, :, None, None]
        return F.relu(out + x)


class SelectHead(nn.Module):
    def __init__(self, cin: int, num_answers: int):
        super().__init__()
        self.select = nn.Conv2d(cin, 2, 1)                        # selection logits: first, second argument
        self.proj = nn.Sequential(nn.Conv2d(cin + 2, HEAD, 1, bias=False), nn.BatchNorm2d(HEAD), nn.ReLU())
        self.sum_norm = nn.BatchNorm1d(2 * HEAD + 2)
        self.mlp = nn.Sequential(nn.Linear(HEAD + 2 * HEAD + 2 * HEAD + 2 + HIDDEN, MLP), nn.ReLU(),
                                 nn.Linear(MLP, num_answers))

    def forward(self, x: torch.Tensor, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> logits (B, A), selection logits (B, 2, h*w), selected mass (B, 2)."""
        sel_logits = self.select(x).flatten(2)                    # (B, 2, hw)
        s = torch.sigmoid(sel_logits)
        p = self.proj(torch.cat([x, coord_maps(x)], 1)).flatten(2)   # (B, D, hw)
        mass = s.sum(2)                                           # (B, 2)
        wsum = torch.einsum("bkn,bdn->bkd", s, p)                  # (B, 2, D)
        wmean = wsum / (mass.unsqueeze(2) + 1e-3)
        sums = self.sum_norm(torch.cat([wsum.flatten(1), mass], 1))
        feats = torch.cat([p.amax(2), wmean.flatten(1), sums, q], 1)
        return self.mlp(feats), sel_logits, mass


class OracleNet(nn.Module):
    """Painted map (B, 16, h, w) + question -> answer logits, with what the losses read."""

    def __init__(self, arm: str, vocab_size: int, num_answers: int, channels: int = 16):
        super().__init__()
        spec = ARMS[arm]
        self.arm, self.noise = arm, spec["noise"]
        self.text = TextEncoder(vocab_size, EMBED, HIDDEN)
        self.inp = nn.Sequential(nn.Conv2d(channels, WIDTH, 1, bias=False), nn.BatchNorm2d(WIDTH), nn.ReLU())
        n = spec["blocks"]
        self.layer_sizes = () if arm == "film" else (WIDTH,) * n
        if arm == "film":
            self.film = nn.Linear(HIDDEN, 2 * WIDTH * n)
            self.blocks = nn.ModuleList(FiLMBlock(WIDTH) for _ in range(n))
            self.head = nn.Sequential(nn.Conv2d(WIDTH + 2, HEAD, 1), nn.BatchNorm2d(HEAD), nn.ReLU())
            self.mlp = nn.Sequential(nn.Linear(HEAD, MLP), nn.ReLU(), nn.Linear(MLP, num_answers))
            return
        self.router = nn.Linear(HIDDEN, WIDTH * n)
        nn.init.normal_(self.router.weight, std=0.01)
        nn.init.constant_(self.router.bias, ROUTE_BIAS)
        block = CoordBlock if spec["coords"] else (lambda w: FilterBlock(w, w, 1))
        self.blocks = nn.ModuleList(block(WIDTH) for _ in range(n))
        if spec["readout"] == "select":
            self.select_head = SelectHead(WIDTH, num_answers)
        else:
            cfg = get_config("small-frn", vocab_size=vocab_size, num_answers=num_answers)
            self.plain_head = PlainHead(WIDTH, cfg)
            self.where = nn.Conv2d(WIDTH, 1, 1)                   # today's side channel

    def forward(self, maps: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor, noise: float | None = None
                ) -> dict:
        q = self.text(tokens, lengths)                            # (B, H)
        x = self.inp(maps)                                        # (B, W, h, w)
        if self.arm == "film":
            gb = self.film(q).view(q.shape[0], len(self.blocks), 2, WIDTH)
            coords = coord_maps(x)
            for k, block in enumerate(self.blocks):
                x = block(x, coords, 1 + gb[:, k, 0], gb[:, k, 1])
            return {"logits": self.mlp(self.head(torch.cat([x, coords], 1)).amax(dim=(2, 3)))}
        route_logits = self.router(q)                             # (B, L*M)
        gates = st_gates(route_logits.float(), self.noise if noise is None else noise, self.training)
        for block, gate in zip(self.blocks, gates.split(WIDTH, dim=1)):
            x = block(x, gate)
        out = {"gates": gates.view(len(gates), len(self.blocks), WIDTH)}
        if hasattr(self, "select_head"):
            out["logits"], out["select"], out["mass"] = self.select_head(x, q)
        else:
            out["logits"] = self.plain_head(x, q)
            out["select"] = self.where(x).flatten(2)              # (B, 1, hw)
        return out
