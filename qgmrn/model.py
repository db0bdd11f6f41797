"""QGMRN (Wu et al.): textual network, routing network, routable visual network, answer head.

forward(image, tokens, lengths) runs four named stages:
    q = encode_question(tokens, lengths)        # (B, H)          paper eq. 1
    gates, route_logits = route(q)              # (B, N) each      paper eq. 3, 11
    fmap = encode_image(image, gates)           # (B, C, h, w)     paper eq. 4
    logits = classify(fmap, q)                  # (B, A)           paper 3.4 / 4.2
and returns ModelOutput(logits, gates (B, L, M), route_logits (B, L, M)).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig, get_config
from .routing import Router
from .visual import VisualNetwork


class ModelOutput(NamedTuple):
    logits: torch.Tensor          # (B, A)
    gates: torch.Tensor           # (B, L, M_max), 0/1; padded modules (FRN) are 0
    route_logits: torch.Tensor    # (B, L, M_max); padded modules hold PAD_LOGIT


# Route logits of padding slots (FRN layers with fewer than M_max filters): far below 0, so a
# padded slot never reads as "executed" nor as a decision close to the threshold.
PAD_LOGIT = -1e4


class TextEncoder(nn.Module):
    """Embedding (uniform init) -> GRU (orthogonal init); feature = hidden state at the last real token.

    Runs the GRU over the padded batch and gathers at lengths - 1: the GRU is causal, so padding
    after a question cannot change its feature, and no pack_padded_sequence enters the graph.
    """

    def __init__(self, vocab_size: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.gru = nn.GRU(embed_dim, hidden_dim, batch_first=True)
        nn.init.uniform_(self.embed.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embed.weight[0].zero_()
        for name, p in self.gru.named_parameters():
            if name.startswith("weight"):
                for chunk in p.chunk(3, dim=0):                   # one orthogonal matrix per gate
                    nn.init.orthogonal_(chunk)
            else:
                nn.init.zeros_(p)

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        out, _ = self.gru(self.embed(tokens))                     # (B, T, H)
        idx = (lengths - 1).clamp(min=0).view(-1, 1, 1).expand(-1, 1, out.shape[2])
        return out.gather(1, idx).squeeze(1)                      # (B, H)


def coord_maps(x: torch.Tensor) -> torch.Tensor:
    """Two maps of relative x and y position in [-1, 1], shaped like x: (B, 2, h, w)."""
    b, _, h, w = x.shape
    ys = torch.linspace(-1.0, 1.0, h, device=x.device, dtype=x.dtype).view(1, 1, h, 1).expand(b, 1, h, w)
    xs = torch.linspace(-1.0, 1.0, w, device=x.device, dtype=x.dtype).view(1, 1, 1, w).expand(b, 1, h, w)
    return torch.cat([xs, ys], dim=1)


class PlainHead(nn.Module):
    """Map + coordinates -> 1x1 conv, BN, ReLU -> global max pool -> [., q] -> MLP (paper 4.2).

    Beyond the paper, two named settings (ModelConfig.readout, .pool; the paper's are the defaults):
    - readout "film": [map, coordinates, q tiled over positions] -> 1x1 conv, BN, ReLU -> 1x1 conv,
      BN, ReLU, so the question shifts every position's features before pooling (FiLM's classifier
      input, Perez et al.), instead of meeting the image only after it.
    - pool "max+sum": the max over positions beside the sum over positions (scaled by the fixed
      1/(h*w), then BatchNorm1d): a max, like a softmax attention, is the same for one object and
      for three; a sum is not. `pooled_sum` is what the training-only count loss reads.
    """

    def __init__(self, cin: int, cfg: ModelConfig):
        super().__init__()
        self.use_q = cfg.question_to_classifier
        self.film = cfg.readout == "film"
        self.sum = cfg.pool == "max+sum"
        d = cfg.head_dim
        if self.film:
            self.proj = nn.Sequential(nn.Conv2d(cin + 2 + cfg.hidden_dim, d, 1, bias=False),
                                      nn.BatchNorm2d(d), nn.ReLU(inplace=True),
                                      nn.Conv2d(d, d, 1, bias=False), nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        else:
            self.proj = nn.Sequential(nn.Conv2d(cin + 2, d, 1, bias=False),
                                      nn.BatchNorm2d(d), nn.ReLU(inplace=True))
        self.sum_norm = nn.BatchNorm1d(d) if self.sum else None
        fin = d * (2 if self.sum else 1) + (cfg.hidden_dim if self.use_q else 0)
        self.mlp = nn.Sequential(nn.Linear(fin, cfg.mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(cfg.mlp_dim, cfg.num_answers))

    def features(self, fmap: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """The projected map (B, head_dim, h, w) that pooling reads."""
        parts = [fmap, coord_maps(fmap)]
        if self.film:
            parts.append(q.to(fmap.dtype).view(*q.shape, 1, 1).expand(-1, -1, *fmap.shape[2:]))
        return self.proj(torch.cat(parts, dim=1))

    def pooled_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum over positions of the projected map x, scaled by the fixed 1/(h*w): (B, head_dim)."""
        return x.mean(dim=(2, 3))

    def forward(self, fmap: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.answer(self.features(fmap, q), q)

    def answer(self, x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        pooled = torch.amax(x, dim=(2, 3))                        # GMP: (B, head_dim)
        if self.sum_norm is not None:
            pooled = torch.cat([pooled, self.sum_norm(self.pooled_sum(x))], dim=1)
        if self.use_q:
            pooled = torch.cat([pooled, q], dim=1)
        return self.mlp(pooled)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the input's precision (a float16 graph keeps the
    statistics exact; export.graph keeps this module's parameters float32)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.normalized_shape, self.weight.float(), self.bias.float(),
                            self.eps).to(x.dtype)


class EncoderLayer(nn.Module):
    """Post-norm Transformer encoder layer (Vaswani et al.), written out so it exports plainly."""

    def __init__(self, dim: int, heads: int, ff: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm1 = LayerNorm32(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff), nn.ReLU(inplace=True), nn.Linear(ff, dim))
        self.norm2 = LayerNorm32(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(d // self.heads), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, d)
        x = self.norm1(x + self.out(y))
        return self.norm2(x + self.ff(x))


class AttentionHead(nn.Module):
    """Paper 3.4: [map, coords, broadcast q] -> Transformer over h*w -> 1x1 conv + spatial softmax
    -> weighted sum (eq. 12) -> MLP."""

    def __init__(self, cin: int, cfg: ModelConfig):
        super().__init__()
        self.inp = nn.Linear(cin + 2 + cfg.hidden_dim, cfg.attn_dim)
        self.layers = nn.ModuleList(EncoderLayer(cfg.attn_dim, cfg.attn_heads, 2 * cfg.attn_dim)
                                    for _ in range(cfg.attn_layers))
        self.score = nn.Linear(cfg.attn_dim, 1)                  # the 1x1 conv
        self.mlp = nn.Sequential(nn.Linear(cfg.attn_dim, cfg.mlp_dim), nn.ReLU(inplace=True),
                                 nn.Linear(cfg.mlp_dim, cfg.num_answers))

    def forward(self, fmap: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        x = torch.cat([fmap, coord_maps(fmap)], dim=1).flatten(2).transpose(1, 2)   # (B, hw, C+2)
        x = torch.cat([x, q.unsqueeze(1).expand(-1, x.shape[1], -1)], dim=2)
        x = self.inp(x)                                           # (B, hw, d_t)
        for layer in self.layers:
            x = layer(x)
        a = torch.softmax(self.score(x), dim=1)                   # (B, hw, 1) spatial softmax
        return self.mlp((a * x).sum(dim=1))                       # f: (B, d_t)


class QGMRN(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        self.text = TextEncoder(cfg.vocab_size, cfg.embed_dim, cfg.hidden_dim)
        self.router = Router(cfg.hidden_dim, cfg.layer_sizes, cfg.tau, cfg.route_bias)
        self.visual = VisualNetwork(cfg)
        head = AttentionHead if cfg.attention else PlainHead
        self.head = head(self.visual.out_channels, cfg)

    # -- stages ---------------------------------------------------------------------------
    def encode_question(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.text(tokens, lengths)                         # (B, H)

    def route(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.router(q)                                     # gates, route_logits: (B, N)

    def encode_image(self, image: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """image (B, 3, S, S), gates (B, N) flat or (B, L, M_max) -> feature map (B, C, h, w)."""
        if gates.dim() == 3:
            gates = torch.cat([gates[:, l, :m] for l, m in enumerate(self.cfg.layer_sizes)], dim=1)
        return self.visual(image, self.router.split(gates))

    def classify(self, fmap: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        return self.head(fmap, q)                                 # (B, A)

    def forward(self, image: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor) -> ModelOutput:
        return self.forward_with_map(image, tokens, lengths)[0]

    def forward_with_map(self, image: torch.Tensor, tokens: torch.Tensor, lengths: torch.Tensor
                         ) -> tuple[ModelOutput, torch.Tensor, torch.Tensor | None]:
        """forward, the question-gated final feature map (B, C, h, w) it classified, and the plain
        head's projected map (B, head_dim, h, w; None for the attention head): what the
        training-only heads read (qgmrn/train/supervision.py). The exported graph is forward's."""
        q = self.encode_question(tokens, lengths)
        gates, route_logits = self.route(q)
        fmap = self.encode_image(image, gates)
        head_map = None
        if isinstance(self.head, PlainHead):
            head_map = self.head.features(fmap, q)
            logits = self.head.answer(head_map, q)
        else:
            logits = self.classify(fmap, q)
        return ModelOutput(logits, self.router.to_layers(gates, 0.0),
                           self.router.to_layers(route_logits, PAD_LOGIT)), fmap, head_map


def create_model(name_or_cfg: str | ModelConfig, **overrides) -> QGMRN:
    """Build a model from a preset name ("brn-c32", "frn+attn", "small", ...) or a config."""
    if isinstance(name_or_cfg, ModelConfig):
        cfg = name_or_cfg.replace(**overrides) if overrides else name_or_cfg
    else:
        cfg = get_config(name_or_cfg, **overrides)
    return QGMRN(cfg)


def grow_model(model: QGMRN, vocab_size: int, num_answers: int) -> QGMRN:
    """A copy of `model` with more word embeddings and answer classes (fine-tuning on new data):
    existing ids keep their weights, new rows start fresh (FiLM's approach for CLEVR-Humans)."""
    cfg = model.cfg
    if vocab_size == cfg.vocab_size and num_answers == cfg.num_answers:
        return model
    new = QGMRN(cfg.replace(vocab_size=vocab_size, num_answers=num_answers))
    old_state, new_state = model.state_dict(), new.state_dict()
    for k, v in old_state.items():
        if new_state[k].shape == v.shape:
            new_state[k] = v
        else:                                   # embedding rows or final classifier rows
            new_state[k][:v.shape[0]] = v
    new.load_state_dict(new_state)
    return new


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def conv_linear_macs(model: nn.Module, run) -> int:
    """Multiply-accumulates of the convolutions and linear layers during `run()` (one sample)."""
    macs = 0

    def conv_hook(m, inp, out):
        nonlocal macs
        macs += out.numel() // out.shape[0] * (m.in_channels // m.groups) * m.kernel_size[0] * m.kernel_size[1]

    def linear_hook(m, inp, out):
        nonlocal macs
        macs += out.numel() // out.shape[0] * m.in_features

    hooks = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            hooks.append(m.register_forward_hook(conv_hook))
        elif isinstance(m, nn.Linear):
            hooks.append(m.register_forward_hook(linear_hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            run()
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return macs


def count_macs(model: QGMRN, question_length: int = 12) -> int:
    """Multiply-accumulates of one eval forward pass with every module executed (an upper bound:
    a closed gate saves its work only on hardware and kernels that skip it)."""
    cfg = model.cfg
    macs = conv_linear_macs(model, lambda: model(torch.zeros(1, 3, cfg.image_size, cfg.image_size),
                                                 torch.ones(1, question_length, dtype=torch.long),
                                                 torch.tensor([question_length])))
    gru = 3 * (cfg.embed_dim + cfg.hidden_dim) * cfg.hidden_dim * question_length
    return macs + gru
