"""Visual networks with routable modules (paper section 3.2).

BRN: ResNeXt bottlenecks; each block is one modular layer whose modules are the c branches of the
grouped 3x3 conv. FRN: ResNet basic blocks; each block is one modular layer whose modules are the
filters of its second conv. Both take one gate tensor (B, M_l) per block.
"""
from __future__ import annotations

import torch
from torch import nn

from .config import ModelConfig


def _norm(kind: str, channels: int, groups: int) -> nn.Module:
    if kind == "group":
        return nn.GroupNorm(min(groups, channels), channels)
    return nn.BatchNorm2d(channels)


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    """Identity, or a strided 1x1 projection where the block changes shape (ResNet option B)."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))


class BranchBlock(nn.Module):
    """ResNeXt bottleneck: 1x1 -> grouped 3x3 (c branches, gated) -> 1x1 -> norm3, plus shortcut."""

    def __init__(self, cin: int, width: int, cout: int, cardinality: int, stride: int,
                 block_norm: str, gn_groups: int):
        super().__init__()
        self.cardinality = cardinality
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=cardinality, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        # (c, width) 0/1 matrix: gate (B, c) @ expand = channel mask (B, width). A constant matmul
        # keeps the exported graph free of per-block dynamic reshapes.
        self.register_buffer("expand", torch.repeat_interleave(torch.eye(cardinality), width // cardinality, dim=1),
                             persistent=False)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        # Paper 4.2: GroupNorm here instead of BatchNorm; routing makes batch statistics unstable.
        self.norm3 = _norm(block_norm, cout, gn_groups)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))                 # (B, W, H, W')
        # Gate after norm and ReLU: gating before the norm would let its bias undo the gate.
        # Branch m owns channel group m of the grouped conv; its gate scales that group.
        out = out * (gate @ self.expand.to(gate.dtype))[:, :, None, None]
        out = self.norm3(self.conv3(out))
        return self.relu(out + self.shortcut(x))


class FilterBlock(nn.Module):
    """ResNet basic block whose second conv's filters are gated before the residual add."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.shortcut = _shortcut(cin, cout, stride)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out)) * gate[:, :, None, None]   # (B, C, H, W) * (B, C, 1, 1)
        return self.relu(out + self.shortcut(x))


class VisualNetwork(nn.Module):
    """Stem, then one routable block per modular layer. forward(image, gates) -> (B, C, h, w)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        k = cfg.stem_kernel
        stem = [nn.Conv2d(3, cfg.stem_width, k, 2, k // 2, bias=False), nn.BatchNorm2d(cfg.stem_width),
                nn.ReLU(inplace=True)]
        if cfg.stem_pool:
            stem.append(nn.MaxPool2d(3, 2, 1))
        self.stem = nn.Sequential(*stem)
        blocks = []
        cin = cfg.stem_width
        for depth, width, stride in zip(cfg.stage_depths, cfg.stage_widths, cfg.stage_strides):
            for i in range(depth):
                s = stride if i == 0 else 1
                if cfg.arch == "brn":
                    cout = width * cfg.bottleneck_expansion
                    blocks.append(BranchBlock(cin, width, cout, cfg.cardinality, s, cfg.block_norm,
                                              cfg.gn_groups))
                else:
                    cout = width
                    blocks.append(FilterBlock(cin, cout, s))
                cin = cout
        self.blocks = nn.ModuleList(blocks)
        self.out_channels = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, image: torch.Tensor, gates: list[torch.Tensor]) -> torch.Tensor:
        x = self.stem(image)
        for block, gate in zip(self.blocks, gates):
            x = block(x, gate)
        return x
