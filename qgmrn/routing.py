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
