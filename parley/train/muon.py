"""Muon for the hidden matrices, AdamW for everything else, as one torch optimizer.

    from parley.train.muon import Muon, orthogonalize
    opt = Muon([{"params": hidden, "muon": True, "lr": 0.02, "weight_decay": 0.1},
                {"params": rest, "muon": False, "lr": 3e-3, "weight_decay": 0.0}])

Muon (Keller Jordan, 2024; nanochat trains its matrices with it) keeps SGD momentum per
matrix and, instead of stepping along the momentum, steps along the nearest semi-orthogonal
matrix to it: every direction the update spans moves by the same amount, so rare directions
are not drowned out by the dominant ones. A few Newton-Schulz iterations approximate that
matrix (U V^T of the SVD U S V^T) with matmuls alone. It suits the 2-D weights inside the
layers; embeddings, the output head, norms, biases and routers are not such maps and stay on
AdamW. The loop picks the split (`build_optimizer` in loop.py) and schedules both learning
rates together; one optimizer means one state_dict, so checkpoints and resume need nothing new.
"""

from __future__ import annotations

import torch

# The quintic x -> a x + b x^3 + c x^5 (applied to singular values) with the coefficients of
# Keller Jordan's Muon: steep near zero, so five steps lift even tiny singular values into
# roughly [0.7, 1.2]. Exact orthogonality is not needed; the speed is.
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def orthogonalize(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """Approximately U V^T for the matrix g = U S V^T: the same shape, singular values near 1.
    Computes in `dtype`: bfloat16 by default (the iteration tolerates it, and a GPU or AMX runs
    it fastest); float32 where runs must agree to float rounding (a float32 run of the loop)."""
    if g.dim() != 2:
        raise ValueError(f"orthogonalize takes a matrix, got shape {tuple(g.shape)}")
    a, b, c = NS_COEFFICIENTS
    x = g.to(dtype)
    tall = x.size(0) > x.size(1)
    if tall:  # iterate on the smaller Gram matrix
        x = x.mT
    x = x / (x.norm() + 1e-7)  # the Frobenius norm bounds the spectral one: singular values start <= 1
    for _ in range(steps):
        gram = x @ x.mT
        x = a * x + (b * gram + c * gram @ gram) @ x
    return (x.mT if tall else x).to(g.dtype)


class Muon(torch.optim.Optimizer):
    """Param groups with "muon": True get Muon (momentum, Nesterov, orthogonalized update scaled by
    sqrt(max(1, rows / cols)) so tall and wide matrices move alike); the others get AdamW with
    torch's formula. Weight decay is decoupled in both (p -= lr * weight_decay * p).
    ns_dtype: what the Newton-Schulz iteration computes in (see `orthogonalize`)."""

    def __init__(self, params, lr: float = 0.02, momentum: float = 0.95, nesterov: bool = True,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8, weight_decay: float = 0.0,
                 ns_steps: int = 5, ns_dtype: torch.dtype = torch.bfloat16):
        defaults = dict(lr=lr, momentum=momentum, nesterov=nesterov, betas=betas, eps=eps,
                        weight_decay=weight_decay, ns_steps=ns_steps, muon=True)
        super().__init__(params, defaults)
        self.ns_dtype = ns_dtype  # not a group setting: it would travel in state_dict as a torch.dtype
        for group in self.param_groups:
            if group["muon"] and any(p.dim() != 2 for p in group["params"]):
                raise ValueError("Muon groups take matrices only: put vectors and embeddings in an AdamW group")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None if closure is None else closure()
        for group in self.param_groups:
            (self._muon if group["muon"] else self._adamw)(group)
        return loss

    def _muon(self, group: dict) -> None:
        lr, mu = group["lr"], group["momentum"]
        for p in group["params"]:
            if p.grad is None:  # an expert that got no token this step
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buf = state["momentum_buffer"]
            buf.mul_(mu).add_(p.grad)
            update = p.grad.add(buf, alpha=mu) if group["nesterov"] else buf
            scale = max(1.0, p.size(0) / p.size(1)) ** 0.5
            p.mul_(1 - lr * group["weight_decay"])
            p.add_(orthogonalize(update, group["ns_steps"], self.ns_dtype), alpha=-lr * scale)

    def _adamw(self, group: dict) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            state["step"] += 1
            m, v, t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            p.mul_(1 - lr * group["weight_decay"])
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            denom = (v.sqrt() / (1 - beta2**t) ** 0.5).add_(group["eps"])
            p.addcdiv_(m, denom, value=-lr / (1 - beta1**t))
