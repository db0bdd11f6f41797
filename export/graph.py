"""The test-time graph: the checkpoint's model in eval mode, deterministic threshold routing applied
as a mask multiply, no noise. Inputs image (B, 3, S, S) float32, tokens (B, T) int64, lengths (B,)
int64; outputs logits (B, A), gates (B, L, M), route_logits (B, L, M)."""
from __future__ import annotations

import torch
from torch import nn

from qgmrn.model import PAD_LOGIT, QGMRN, LayerNorm32

INPUT_NAMES = ("image", "tokens", "lengths")


class TestTimeModel(nn.Module):
    """Exactly the path the runtime runs. With half_visual, the visual network and head run in
    float16 while the question encoder, routing FC and threshold stay float32: a gate that flips
    changes which modules run, so the routing decisions keep full precision."""

    __test__ = False          # not a pytest class

    def __init__(self, model: QGMRN, half_visual: bool = False):
        super().__init__()
        self.model = model.eval()
        self.half_visual = half_visual
        if half_visual:
            self.model.visual.half()
            self.model.head.half()
            for m in self.model.head.modules():
                if isinstance(m, LayerNorm32):
                    m.float()

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        m = self.model
        q = m.encode_question(tokens, lengths)                    # (B, H) float32
        gates, route_logits = m.route(q)                          # (B, N): logit > 0, float32
        if self.half_visual:
            fmap = m.encode_image(image.half(), gates.half())
            logits = m.classify(fmap, q.half()).float()
        else:
            logits = m.classify(m.encode_image(image, gates), q)
        return (logits, m.router.to_layers(gates, 0.0),
                m.router.to_layers(route_logits, PAD_LOGIT))
