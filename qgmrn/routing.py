"""Routing network (paper section 3.3, appendix B) and the load-balancing loss (section 3.5)."""
from __future__ import annotations

import torch
from torch import nn


class Router(nn.Module):
    """Question feature -> routing path.

    Training: Gumbel-sigmoid samples with a straight-through estimator (paper eq. 11, alg. 1).
    Eval: deterministic `gate = route_logit > 0` (sigmoid(x) > 0.5 <=> x > 0), no noise.
    """

    def __init__(self, hidden_dim: int, layer_sizes: tuple[int, ...], tau: float, bias: float):
        super().__init__()
        self.layer_sizes = tuple(layer_sizes)
        self.tau = tau
        # The trainer gives the noise its own generator, so that resuming restores it exactly
        # whatever else draws from the global RNG (data loader seeds, other libraries).
        self.noise_generator: torch.Generator | None = None
        self.fc = nn.Linear(hidden_dim, sum(layer_sizes))
        # Small weights: every module starts with execution probability sigmoid(bias) = 0.7,
        # yet the question can move its logits from the first step on.
        nn.init.normal_(self.fc.weight, std=0.01)
        nn.init.constant_(self.fc.bias, bias)

    def forward(self, q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = self.fc(q)                                       # (B, N) with N = sum(layer_sizes)
        if self.training:
            # float32 noise and threshold even under bf16 autocast (bf16 has 8 mantissa bits)
            gates = gumbel_sigmoid_st(logits.float(), self.tau, self.noise_generator)
        else:
            gates = (logits > 0).to(logits.dtype)                 # the test-time mask
        return gates, logits

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        """(B, N) -> one (B, M_l) tensor per modular layer."""
        return list(torch.split(flat, self.layer_sizes, dim=1))

    def to_layers(self, flat: torch.Tensor, fill: float = 0.0) -> torch.Tensor:
        """(B, N) -> (B, L, M_max); layers with fewer modules (FRN) are padded with `fill`."""
        m = max(self.layer_sizes)
        if all(s == m for s in self.layer_sizes):
            return flat.reshape(flat.shape[0], len(self.layer_sizes), m)
        parts = [nn.functional.pad(p, (0, m - p.shape[1]), value=fill) for p in self.split(flat)]
        return torch.stack(parts, dim=1)


def gumbel_sigmoid_st(logits: torch.Tensor, tau: float, generator: torch.Generator | None = None,
                      eps: float = 1e-6) -> torch.Tensor:
    """Binary gates in the forward pass, sigmoid gradients in the backward pass (alg. 1)."""
    u = torch.rand(logits.shape, generator=generator, device=logits.device, dtype=logits.dtype)
    u = u.clamp_(eps, 1.0 - eps)
    t = torch.log(u) - torch.log1p(-u)                            # Logistic(0, 1) noise
    soft = torch.sigmoid((t + logits) / tau)
    hard = (soft > 0.5).to(soft.dtype)
    return hard - soft.detach() + soft


def load_balancing_loss(gates: torch.Tensor, layer_sizes: tuple[int, ...]) -> torch.Tensor:
    """Sum over layers of CV(load)^2, load = per-module count of executing samples (paper 3.5).

    gates: (B, L, M_max). Uses the unbiased variance, as Shazeer et al.'s cv_squared does.
    """
    loss = gates.new_zeros(())
    load = gates.sum(dim=0)                                       # (L, M_max)
    for l, m in enumerate(layer_sizes):
        x = load[l, :m]
        loss = loss + x.var() / (x.mean() ** 2 + 1e-10)
    return loss


def execution_ratio(gates: torch.Tensor, layer_sizes: tuple[int, ...]) -> torch.Tensor:
    """Fraction of modules executed per sample and layer: (B, L)."""
    sizes = torch.tensor(layer_sizes, dtype=gates.dtype, device=gates.device)
    return gates.sum(dim=2) / sizes


def target_rate_loss(gates: torch.Tensor, layer_sizes: tuple[int, ...], target: float) -> torch.Tensor:
    """ConvNet-AIG's target-rate loss (Veit & Belongie, ECCV 2018): mean over layers of
    (fraction of the layer's modules executed over the batch - target)^2.

    The paper's load-balancing term is zero when every gate is open; this one is not, so it is the
    "sparsity constraint" the paper's section 4.6 leaves open. Training only. gates: (B, L, M_max),
    straight-through gates, so the gradient reaches the routing logits.
    """
    sizes = torch.tensor(layer_sizes, dtype=gates.dtype, device=gates.device)
    rate = gates.sum(dim=(0, 2)) / (sizes * gates.shape[0])      # (L,) padded slots are 0
    return ((rate - target) ** 2).mean()


def routing_use(gates: "np.ndarray", layer_sizes: tuple[int, ...], images: list, types: list) -> dict:
    """How much the routing carries the question, from eval-mode gates (N, L, M_max) of N questions:

    - filters_executed: executed modules / all modules, over every question;
    - per_layer_executed, per_type_executed: the same per modular layer and per question type;
    - always_on / always_off: modules whose gate is the same for every question (of `modules`);
    - differ_same_image: over pairs of questions about one image, the fraction of modules whose
      gate differs between the two (0: the routing ignores the question).
    """
    import numpy as np

    mask = np.zeros(gates.shape[1:], dtype=bool)
    for l, m in enumerate(layer_sizes):
        mask[l, :m] = True
    g = gates.astype(bool) & mask                                   # (N, L, M)
    total = int(mask.sum())
    per_q = g.reshape(len(g), -1).sum(1) / total                    # (N,)
    out: dict = {"questions": int(len(g)), "modules": total}
    if not len(g):
        return out
    on = g.all(axis=0) & mask
    off = (~g).all(axis=0) & mask
    by_image: dict = {}
    for i, img in enumerate(images):
        by_image.setdefault(img, []).append(i)
    a, b = [], []
    for idx in by_image.values():                                   # consecutive pairs per image
        for j in range(0, len(idx) - 1, 2):
            a.append(idx[j])
            b.append(idx[j + 1])
    differ = float((g[a] != g[b]).reshape(len(a), -1).sum(1).mean() / total) if a else None
    by_type: dict = {}
    for i, t in enumerate(types):
        if t is not None:
            by_type.setdefault(t, []).append(i)
    out.update({
        "filters_executed": float(per_q.mean()),
        "per_layer_executed": [float(g[:, l, :m].mean()) for l, m in enumerate(layer_sizes)],
        "per_type_executed": {t: float(per_q[idx].mean()) for t, idx in by_type.items()},
        "always_on": int(on.sum()), "always_off": int(off.sum()),
        "differ_same_image": differ, "image_pairs": len(a),
    })
    return out


def format_routing_use(u: dict) -> str:
    """One line: what a log or a table shows of routing_use's figures."""
    if "filters_executed" not in u:
        return "routing: no questions"
    differ = "n/a" if u["differ_same_image"] is None else f"{100 * u['differ_same_image']:.1f}%"
    layers = "/".join(f"{100 * x:.0f}" for x in u["per_layer_executed"])
    return (f"routing: {100 * u['filters_executed']:.1f}% of filters executed (layers {layers}%), "
            f"{u['always_on']} of {u['modules']} gates on for every question, {u['always_off']} off for every "
            f"question, {differ} differ between two questions about one image")
