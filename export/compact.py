"""Compact routed execution: the test-time graph in which a module the question switched off is not
computed (issue 40; the paper's section 4.6 asks the frameworks for it).

The masked graph (export/graph.py) computes every module and multiplies the switched-off ones by
zero, so a question that executes 57% of the modules costs what one that executes all of them
does. Here each modular layer gathers the weights of the modules that are on and runs only those.
ONNX has no dynamic group count and no conv whose weight shape changes, so:

- BRN block (ResNeXt bottleneck; branch m owns channel group m of width d): the 1x1 conv in is a
  Gemm over the rows of the active groups (BatchNorm folded in), the 1x1 conv out a MatMul over
  the columns that read them. The grouped 3x3 stays the static conv (with the backend's fast
  kernel): its input is the active channels scattered into a zero map, and only the active
  channels are read back from it, so it costs what it costs in the masked graph.
- FRN block: the second conv's active filters only (an ONNX Conv whose weight is gathered), added
  into the shortcut at their channels.

Two graphs: batch1=True (exported at batch 1, every shape a constant but the active count) finds
every layer's modules with one NonZero and one Split and skips the gate multiply (each gate is 1);
the general graph (dynamic batch) runs the union of the batch's modules and multiplies each
question's own gates, so every answer is the masked graph's. A layer with every module off runs
module 0 with a zero gate: the masked graph's numbers, without empty tensors.
What it is worth on a CPU, against the masked graph: bench/compact_sweep.py, docs/bench/compact.md.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from qgmrn.model import PAD_LOGIT, QGMRN
from qgmrn.visual import BranchBlock, FilterBlock


def _fold(bn: nn.BatchNorm2d) -> tuple[torch.Tensor, torch.Tensor]:
    """Eval BatchNorm as y = x * scale + shift, per channel."""
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    return scale, bn.bias - bn.running_mean * scale


def _float_type(rank: int):
    """A float32 tensor type of `rank` unknown dims: what a hand-written node tells the exporter,
    which otherwise reads an unknown dtype downstream as float64."""
    return torch._C.TensorType.create_from_tensor(torch.zeros([1] * rank)).with_sizes([None] * rank)


class _SplitBy(torch.autograd.Function):
    """Split a 1-D tensor into len(counts) parts of counts[i] elements (ONNX Split with a computed
    `split` input: one node for every layer's module indices)."""

    @staticmethod
    def forward(ctx, x, counts, n: int):
        return tuple(torch.split(x, counts.tolist()))

    @staticmethod
    def symbolic(g, x, counts, n: int):
        return g.op("Split", x, counts, axis_i=0, outputs=n)


class _ScatterRows(torch.autograd.Function):
    """A copy of data whose rows `rows` are `updates`: one ScatterND node (torch's index_copy
    exports a shape computation around it)."""

    @staticmethod
    def forward(ctx, data, rows, updates):
        return data.index_copy(0, rows, updates)

    @staticmethod
    def symbolic(g, data, rows, updates):
        rank = len(data.type().sizes())
        axes = g.op("Constant", value_t=torch.tensor([1]))
        index = g.op("Unsqueeze", rows, axes)
        out = g.op("ScatterND", data, index, updates)
        out.setType(_float_type(rank))               # the exporter's dtype for what follows
        return out


def layer_indices(gates: torch.Tensor, offsets: list, widths: list) -> list:
    """Batch 1, every layer at once: gates (1, L, M_max) -> per layer (module indices (k,), channel
    indices (k*d,) for d = widths[l] channels per module, 1 if any module is on else 0); a layer
    with none on gets module 0, which that 0 multiplies."""
    g = gates[0]                                                          # (L, M_max)
    first = torch.zeros_like(g[:1])
    first[0, 0] = 1.0
    any_on = g.amax(1, keepdim=True)                                      # (L, 1)
    on = (g + first * (1.0 - any_on)) > 0.5                               # (L, M_max)
    modules = torch.nonzero(on)[:, 1]                                      # (K,) in layer order
    parts = _SplitBy.apply(modules, on.long().sum(1), len(widths))
    out = []
    for l, (idx, off, d) in enumerate(zip(parts, offsets, widths)):
        out.append((idx, (idx[:, None] * d + off).reshape(-1) if d > 1 else idx, any_on[l]))
    return out


def active_modules(gate: torch.Tensor, first: torch.Tensor) -> torch.Tensor:
    """Indices (k,) of the modules on for any question of the batch; [0] when none is (its zero
    gate then keeps the layer's output exact). first: the constant one-hot of module 0."""
    union = gate.amax(0)                                            # (M,)
    return torch.nonzero(union + first * (1.0 - union.amax()) > 0.5).reshape(-1)


class CompactBranchBlock(nn.Module):
    """Shapes are the block's own constants (the model's input size is fixed), so the graph
    computes no shapes at run time but the active count k and the batch (-1 in every reshape)."""

    def __init__(self, block: BranchBlock, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        c = block.cardinality
        width = block.conv1.out_channels
        self.d, self.width, self.cin, self.cout = width // c, width, block.conv1.in_channels, block.conv3.out_channels
        self.in_hw, self.out_hw = in_hw, out_hw
        s1, b1 = _fold(block.bn1)
        self.register_buffer("w1", (block.conv1.weight[:, :, 0, 0] * s1[:, None]).detach().clone())   # (W, cin)
        self.register_buffer("b1", b1.detach().clone()[:, None])                                      # (W, 1)
        self.conv2, self.bn2 = block.conv2, block.bn2         # static grouped conv (BN fused by the backend)
        self.register_buffer("w3t", block.conv3.weight[:, :, 0, 0].t().detach().clone())             # (W, cout)
        self.register_buffer("expand", block.expand.clone(), persistent=False)                      # (c, W)
        self.register_buffer("first", F.one_hot(torch.tensor(0), c).float(), persistent=False)
        self.register_buffer("offsets", torch.arange(self.d)[None, :], persistent=False)            # (1, d)
        self.norm3, self.shortcut = block.norm3, block.shortcut
        self.register_buffer("zeros", torch.zeros(width, *in_hw), persistent=False)

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        (h, w), (ho, wo) = self.in_hw, self.out_hw
        idx = active_modules(gate, self.first)                                       # (k,)
        ch = (idx[:, None] * self.d + self.offsets).reshape(-1)                      # (k*d,) active channels
        y = torch.relu(torch.matmul(self.w1.index_select(0, ch), x.reshape(-1, self.cin, h * w))
                       + self.b1.index_select(0, ch))                                # (B, kd, hw)
        # The grouped 3x3 reads only its own group: put the active channels in place, zeros
        # elsewhere (a gather from [y, a zero row]: position of each channel in ch, or the zero row).
        on = torch.matmul(gate.amax(0) + self.first * (1.0 - gate.amax()), self.expand)   # (W,) 0/1
        where = torch.where(on > 0.5, torch.cumsum(on, 0) - 1.0, on.sum()).long()
        full = torch.cat([y, y[:, :1] * 0.0], 1).index_select(1, where)              # (B, W, hw)
        z = torch.relu(self.bn2(self.conv2(full.reshape(-1, self.width, h, w))))
        gch = torch.matmul(gate, self.expand).index_select(1, ch)                   # (B, kd) own gates
        z = z.reshape(-1, self.width, ho * wo).index_select(1, ch) * gch[:, :, None]
        out = torch.matmul(self.w3t.index_select(0, ch).t(), z).reshape(-1, self.cout, ho, wo)
        return torch.relu(self.norm3(out) + self.shortcut(x))

    def forward_one(self, x: torch.Tensor, ch: torch.Tensor, any_on: torch.Tensor) -> torch.Tensor:
        """Batch 1, ch: the active channels: the question's own modules, no gate multiply (each
        is 1, but any_on, 0 for a layer with none on), the grouped 3x3's input scattered into a
        constant zero map."""
        (h, w), (ho, wo) = self.in_hw, self.out_hw
        y = torch.relu(torch.addmm(self.b1.index_select(0, ch), self.w1.index_select(0, ch),
                                   x.reshape(self.cin, h * w)))                      # (kd, hw)
        full = _ScatterRows.apply(self.zeros, ch, y.reshape(-1, h, w))              # (W, h, w)
        z = torch.relu(self.bn2(self.conv2(full.unsqueeze(0))))
        z = z.reshape(self.width, ho * wo).index_select(0, ch)
        out = torch.matmul(self.w3t.index_select(0, ch).t() * any_on, z).reshape(1, self.cout, ho, wo)
        return torch.relu(self.norm3(out) + self.shortcut(x))


class _Conv3x3(torch.autograd.Function):
    """A 3x3 conv (stride 1, pad 1) whose weight is computed in the graph: the TorchScript exporter
    refuses a conv whose kernel shape it cannot see, so the ONNX Conv node is written here."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        return F.conv2d(x, weight, bias, padding=1)

    @staticmethod
    def symbolic(g, x, weight, bias):
        out = g.op("Conv", x, weight, bias, kernel_shape_i=[3, 3], pads_i=[1, 1, 1, 1], strides_i=[1, 1])
        out.setType(_float_type(4))
        return out


class CompactFilterBlock(nn.Module):
    def __init__(self, block: FilterBlock, in_hw: tuple[int, int], out_hw: tuple[int, int]):
        super().__init__()
        s2, b2 = _fold(block.bn2)
        self.conv1, self.bn1 = block.conv1, block.bn1
        self.c, self.out_hw = block.conv2.out_channels, out_hw
        self.register_buffer("w2", (block.conv2.weight * s2[:, None, None, None]).detach().clone())   # (C, C, 3, 3)
        self.register_buffer("b2", b2.detach().clone())
        self.register_buffer("first", F.one_hot(torch.tensor(0), self.c).float(), persistent=False)
        self.register_buffer("zeros", torch.zeros(self.c, out_hw[0] * out_hw[1]), persistent=False)
        self.shortcut = block.shortcut

    def forward_one(self, x: torch.Tensor, idx: torch.Tensor, any_on: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        ho, wo = self.out_hw
        y = _Conv3x3.apply(out, self.w2.index_select(0, idx) * any_on, self.b2.index_select(0, idx) * any_on)
        added = _ScatterRows.apply(self.zeros, idx, y.reshape(-1, ho * wo))          # (C, hw)
        return torch.relu(self.shortcut(x) + added.reshape(1, self.c, ho, wo))

    def forward(self, x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        ho, wo = self.out_hw
        idx = active_modules(gate, self.first)
        y = _Conv3x3.apply(out, self.w2.index_select(0, idx), self.b2.index_select(0, idx))   # (B, k, h, w)
        y = y * gate.index_select(1, idx)[:, :, None, None]
        full = self.shortcut(x).reshape(-1, self.c, ho * wo).index_add(1, idx, y.reshape(-1, y.shape[1], ho * wo))
        return torch.relu(full.reshape(-1, self.c, ho, wo))


class CompactTestTimeModel(nn.Module):
    """TestTimeModel's inputs and outputs, with switched-off modules skipped (float32)."""

    __test__ = False

    def __init__(self, model: QGMRN, batch1: bool = False):
        super().__init__()
        self.model = model.eval()
        size = model.cfg.image_size
        with torch.no_grad():                                   # each block's input and output size
            x = model.visual.stem(torch.zeros(1, 3, size, size))
            hw = []
            for block in model.visual.blocks:
                y = block(x, torch.ones(1, block.conv2.out_channels if isinstance(block, FilterBlock)
                                        else block.cardinality))
                hw.append((tuple(x.shape[2:]), tuple(y.shape[2:])))
                x = y
        self.blocks = nn.ModuleList(
            (CompactBranchBlock if isinstance(b, BranchBlock) else CompactFilterBlock)(b, *shapes)
            for b, shapes in zip(model.visual.blocks, hw))
        self.batch1 = batch1
        self.channels = [b.d if isinstance(b, CompactBranchBlock) else 1 for b in self.blocks]
        for i, d in enumerate(self.channels):
            self.register_buffer(f"offsets{i}", torch.arange(d)[None, :], persistent=False)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor):
        m = self.model
        q = m.encode_question(tokens, lengths)
        gates, route_logits = m.route(q)                                    # (B, N)
        layered = m.router.to_layers(gates, 0.0)                            # (B, L, M_max)
        x = m.visual.stem(image)
        if self.batch1:                                                     # exported with batch 1
            offsets = [getattr(self, f"offsets{i}") for i in range(len(self.blocks))]
            for block, (idx, ch, any_on) in zip(self.blocks, layer_indices(layered, offsets, self.channels)):
                x = block.forward_one(x, ch if isinstance(block, CompactBranchBlock) else idx, any_on)
        else:
            for block, gate in zip(self.blocks, m.router.split(gates)):
                x = block(x, gate)
        logits = m.classify(x, q)
        return logits, layered, m.router.to_layers(route_logits, PAD_LOGIT)
