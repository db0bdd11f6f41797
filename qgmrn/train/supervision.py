"""Training-only supervision from scenes and programs (beyond the paper; DESIGN.md).

A criterion beside QGMRN, as DETR keeps its auxiliary losses in a SetCriterion: the model's forward
stays the paper's, and the heads here are saved under their own checkpoint key, so the exported
test-time graph, parity and the runtime never see them.

- scene loss (scene_weight): 1x1 conv heads on the visual network's final map predict, at each
  object's cell, its colour, shape, size and material (cross-entropy), and where objects are
  (a presence map, binary cross-entropy over every cell).
  The map is the question-gated one, the map with every module executed (a second visual pass;
  scene_gates="open") or the stem's, before any routed block (scene_gates="stem": no second pass,
  and the routed blocks learn only from the answer and the where loss).
- where loss (where_weight): one 1x1 conv channel on the *gated* final map marks the cells of the
  objects the question's program points at (binary cross-entropy over every cell). The channel
  does not see the question; only the routing can make the map answer "where", so the loss
  teaches the routing to select what the question names.
- count loss (count_weight; with the model setting pool="max+sum"): a linear read of the head's sum
  over positions predicts a count question's answer (smooth L1), so that sum learns to count. It
  needs only the answers: a count answer is an answer that is a whole number.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.programs import ATTRIBUTES
from ..data.supervision import ATTRIBUTE_ORDER
from ..model import QGMRN, ModelOutput

CLASSES = tuple(len(ATTRIBUTES[a]) for a in ATTRIBUTE_ORDER)        # colour 8, shape 3, size 2, material 2


class AuxLosses(NamedTuple):
    scene: torch.Tensor            # scalar; 0 when the scene loss is off
    where: torch.Tensor            # scalar; 0 when the where loss is off
    count: torch.Tensor            # scalar; 0 when the count loss is off


class SupervisionHeads(nn.Module):
    """1x1 conv heads on the final map (B, C, h, w): attributes + presence, and "where"; a linear
    count read of the plain head's pooled sum."""

    def __init__(self, channels: int, scene: bool, where: bool, count_answers: "list[str] | None" = None,
                 head_dim: int = 0, scene_channels: int = 0):
        super().__init__()
        self.scene = nn.Conv2d(scene_channels or channels, sum(CLASSES) + 1, 1) if scene else None
        self.where = nn.Conv2d(channels, 1, 1) if where else None
        self.count = nn.Linear(head_dim, 1) if count_answers else None
        # answer id -> its count (-1: not a count answer); rebuilt from the answers, never saved
        self.register_buffer("answer_counts", torch.tensor(
            [float(a) if a.isdigit() else -1.0 for a in count_answers or []]), persistent=False)

    def count_loss(self, pooled_sum: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """pooled_sum (B, head_dim) from PlainHead.pooled_sum; labels (B,) answer ids."""
        target = self.answer_counts[labels]
        counted = target >= 0
        pred = self.count(pooled_sum.float()).squeeze(1)
        if not counted.any():
            return pred.sum() * 0.0
        return F.smooth_l1_loss(pred[counted], target[counted])

    def scene_loss(self, fmap: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """fmap (B, C, h, w); targets (B, K, 7) from data.supervision.SceneTargets.item."""
        logits = self.scene(fmap).float().flatten(2)                   # (B, 16, h*w)
        cells, real = _cells(targets, fmap.shape[2], fmap.shape[3])    # (B, K), (B, K)
        at = logits.gather(2, cells.unsqueeze(1).expand(-1, logits.shape[1], -1))   # (B, 16, K)
        at = at.transpose(1, 2)[real]                                  # (objects, 16)
        ids = targets[..., 2:6][real].long()                           # (objects, 4)
        loss, start = logits.new_zeros(()), 0
        for j, n in enumerate(CLASSES):
            loss = loss + F.cross_entropy(at[:, start:start + n], ids[:, j])
            start += n
        presence = _mark(cells, real, logits.shape[2])                 # (B, h*w)
        return loss / len(CLASSES) + F.binary_cross_entropy_with_logits(logits[:, -1], presence)

    def where_loss(self, fmap: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        logits = self.where(fmap).float().flatten(1)                   # (B, h*w)
        cells, real = _cells(targets, fmap.shape[2], fmap.shape[3])
        usable = targets[:, 0, 6] >= 0                                 # the program could be used
        if not usable.any():
            return logits.sum() * 0.0
        marked = _mark(cells, real & (targets[..., 6] > 0.5), logits.shape[1])
        return F.binary_cross_entropy_with_logits(logits[usable], marked[usable])


def _cells(targets: torch.Tensor, h: int, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Each object's cell index on an h x w map, and which rows are real objects: (B, K) each."""
    real = targets[..., 0] >= 0
    cx = (targets[..., 0].clamp(min=0) * w).long().clamp(max=w - 1)
    cy = (targets[..., 1].clamp(min=0) * h).long().clamp(max=h - 1)
    return cy * w + cx, real


def _mark(cells: torch.Tensor, which: torch.Tensor, n: int) -> torch.Tensor:
    """(B, n) float map: 1 at the cells of the objects `which` selects."""
    out = torch.zeros(cells.shape[0], n, device=cells.device)
    return out.scatter_reduce_(1, cells, which.float(), reduce="amax")


class TrainingForward(nn.Module):
    """The model and its training-only heads as one module (what DDP wraps):
    forward(image, tokens, lengths, targets) -> (ModelOutput, AuxLosses)."""

    def __init__(self, model: QGMRN, heads: SupervisionHeads | None, scene_gates: str = "question"):
        super().__init__()
        self.model, self.heads, self.scene_gates = model, heads, scene_gates

    def forward(self, image, tokens, lengths, targets=None, labels=None) -> tuple[ModelOutput, AuxLosses]:
        if self.heads is None:
            output = self.model(image, tokens, lengths)
            zero = output.logits.new_zeros((), dtype=torch.float32)
            return output, AuxLosses(zero, zero, zero)
        output, fmap, head_map = self.model.forward_with_map(image, tokens, lengths)   # fmap: gated
        zero = output.logits.new_zeros((), dtype=torch.float32)
        scene = where = count = zero
        if self.heads.scene is not None:
            if self.scene_gates == "open":                             # every module executed
                sizes = self.model.cfg.layer_sizes
                opened = self.model.visual(image, [image.new_ones(image.shape[0], m) for m in sizes])
                scene = self.heads.scene_loss(opened, targets)
            elif self.scene_gates == "stem":                           # before any routed block
                scene = self.heads.scene_loss(self.model.visual.stem(image), targets)
            else:
                scene = self.heads.scene_loss(fmap, targets)
        if self.heads.where is not None:
            where = self.heads.where_loss(fmap, targets)
        if self.heads.count is not None:
            count = self.heads.count_loss(self.model.head.pooled_sum(head_map), labels)
        return output, AuxLosses(scene, where, count)


def build_heads(channels: int, scene_weight: float, where_weight: float, count_weight: float = 0.0,
                answers: "list[str] | None" = None, head_dim: int = 0,
                scene_channels: int = 0) -> SupervisionHeads | None:
    """The heads a run's weights ask for; None for the paper's loss alone. scene_channels: the
    channels of the map the scene loss reads when it is not the final map's (the stem's)."""
    if scene_weight <= 0 and where_weight <= 0 and count_weight <= 0:
        return None
    return SupervisionHeads(channels, scene_weight > 0, where_weight > 0,
                            list(answers or []) if count_weight > 0 else None, head_dim, scene_channels)
