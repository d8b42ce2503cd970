"""Adam on the stacked tensors in cache-sized member chunks: the fast path's optimizer step.

Equal to the reference (torchopt's `scale_by_adam`, then `p -= lr * direction`), but each
chunk of members runs every pass of the update (moments, direction, finite check, step,
decoder renormalisation) while its tensors are still in cache. On CPU a chunk's working
set fits the 32 MiB L3 while the whole stack often does not: the same passes over the
whole stack ran from memory and cost as much as the GEMMs on small SAEs. Where the C kernel
(kernels/native.py) makes the update one pass anyway, it takes the whole stack at once.

A member whose loss or gradient is not finite takes no step: its params and moments stay
exactly as they were (the ensemble decides when such steps in a row freeze it).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

from sae_ensemble.kernels import native

BETAS, EPS = (0.9, 0.999), 1e-8  # Adam's defaults, as torchopt's scale_by_adam and SAELens use them
CHUNK_BYTES = 4 * 2**20  # params bytes per chunk: with its grads, moments and direction (~12 MiB) it stays in L3


def member_chunks(n_members: int, member_bytes: int, device: torch.device) -> list[slice]:
    """Slices of the member axis; one slice on CUDA (no cache to fit), cache-sized on CPU."""
    per_chunk = n_members if device.type == "cuda" else max(1, CHUNK_BYTES // max(member_bytes, 1))
    return [slice(start, min(start + per_chunk, n_members)) for start in range(0, n_members, per_chunk)]


class AdamState(NamedTuple):
    """Adam's moments of every param, stacked like the params (the step count is the caller's)."""

    mu: dict[str, torch.Tensor]
    nu: dict[str, torch.Tensor]

    @classmethod
    def zeros_like(cls, params: dict[str, torch.Tensor]) -> AdamState:
        return cls(*({name: torch.zeros_like(p) for name, p in params.items()} for _ in range(2)))


def gradient_norms(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    """Each member's L2 norm over all its gradients [M] (a param may be [M]), taken as
    torch.nn.utils.clip_grad_norm_ takes one model's: the norm of the params' norms (one read of each)."""
    per_param = [torch.linalg.vector_norm(g.reshape(g.shape[0], -1).float(), dim=1) for g in grads.values()]
    return torch.linalg.vector_norm(torch.stack(per_param), dim=0)


def clip_factors(norms: torch.Tensor, max_norm: torch.Tensor) -> torch.Tensor:
    """The factor [M] that scales each member's gradient of norm `norms` to at most `max_norm` [M], as
    clip_grad_norm_ scales one model's (max_norm / (norm + 1e-6), capped at 1); a max_norm of inf gives 1."""
    return torch.clamp(max_norm / (norms + 1e-6), max=1.0)


@torch.no_grad()
def step_(
    params: dict[str, torch.Tensor],
    grads: dict[str, torch.Tensor],
    state: AdamState,
    count: torch.Tensor,
    lr: torch.Tensor,
    ok: torch.Tensor,
    check_on_host: bool,
    one_pass: bool = True,
    unit: torch.Tensor | bool = True,
    max_grad_norm: torch.Tensor | None = None,
) -> torch.Tensor:
    """Update params and moments in place for step number `count` (1-based, a 0-d tensor, so a
    captured CUDA graph reads it afresh each replay); return taken [M].

    `ok` [M] says which members may step (alive, finite loss). A member whose gradient's norm is not
    finite (a NaN or inf in it, or elements too large to square in float32) is held back too. A held-back
    member's params and moments stay exactly as they were: its gradient is replaced by 0 and its decay
    rates by 1, so Adam leaves its moments alone, and its learning rate by 0. `check_on_host`: decide per
    chunk on the host whether anyone is held back (CPU, where reading a flag is free; the usual all-taken
    case then skips the selections) instead of selecting on the device every step (CUDA). `one_pass`: let
    a chunk whose members all step run kernels/native.py's C kernel (CPU; the same numbers in one pass).
    `unit` [M]: the members whose W_dec rows are rescaled to unit norm after the step (True: all, False:
    none; learned-norm members, sae.effective, keep theirs). `max_grad_norm` [M] (or None): each member's
    gradient is clipped to this norm first (`clip_factors`; inf: not clipped), inside the C kernel's pass
    where it runs.
    """
    (b1, b2), eps, mu, nu = BETAS, EPS, state.mu, state.nu
    correction1, correction2 = 1 - torch.pow(b1, count), 1 - torch.pow(b2, count)
    M = lr.shape[0]
    norms = gradient_norms(grads)  # one read of each gradient: the finite check's, and clipping's
    taken = ok & torch.isfinite(norms)
    scale = None if max_grad_norm is None else clip_factors(norms, max_grad_norm)
    one_pass = one_pass and check_on_host and not torch.compiler.is_compiling() and native.available()
    corrections = (correction1.item(), correction2.item()) if one_pass else None
    names = list(params)
    member_bytes = sum(p[0].numel() * p.element_size() for p in params.values())
    # The C kernel makes one pass whatever the chunk, so it takes the whole stack at once: per
    # chunk, the small torch ops around each call cost more than the cache saves (docs/benchmarks.md).
    whole = one_pass and native.fits(*params.values(), *grads.values(), *mu.values(), *nu.values(), lr)
    for chunk in [slice(0, M)] if whole else member_chunks(M, member_bytes, lr.device):
        steps = taken[chunk]
        hold = not bool(steps.all()) if check_on_host else True
        for name in names:
            p, g, m, v = params[name][chunk], grads[name][chunk], mu[name][chunk], nu[name][chunk]
            if hold:
                keep = broadcast(steps, p)
                g = torch.where(keep, _scaled(g, scale, chunk), 0.0)  # a held-back member's scale may be NaN
                decay1, decay2 = torch.where(keep, b1, 1.0), torch.where(keep, b2, 1.0)
                m.mul_(decay1).addcmul_(g, 1 - decay1)
                v.mul_(decay2).addcmul_(g * g, 1 - decay2)
                step_size = broadcast(torch.where(steps, lr[chunk], 0.0), p)
            elif whole or one_pass and native.fits(p, g, m, v, lr):
                native.adam_(p, g, m, v, lr[chunk], BETAS, corrections, eps, None if scale is None else scale[chunk])
                step_size = None
            else:
                g = _scaled(g, scale, chunk)
                m.mul_(b1).add_(g, alpha=1 - b1)
                v.mul_(b2).addcmul_(g, g, value=1 - b2)
                step_size = broadcast(lr[chunk], p)
            if step_size is not None:  # torchopt's direction: (m / c1) / (sqrt(v / c2) + eps)
                direction = torch.div(v, correction2).sqrt_().add_(eps)
                direction = torch.div(m, correction1).div_(direction)
                p.addcmul_(step_size, direction, value=-1)
            if name != "W_dec" or unit is False:
                continue
            if hold or unit is not True:
                rescaled = steps if unit is True else steps & unit[chunk]
                p.copy_(torch.where(broadcast(rescaled, p), F.normalize(p, dim=-1), p))
            else:  # F.normalize's arithmetic, in place
                p.div_(p.norm(2, -1, keepdim=True).clamp_min(1e-12))
    return taken


def _scaled(g: torch.Tensor, scale: torch.Tensor | None, chunk: slice) -> torch.Tensor:
    """A chunk's gradient times its members' clipping factors, as clip_grad_norm_'s g.mul_ (None: as it is)."""
    return g if scale is None else g * broadcast(scale[chunk], g)


def broadcast(per_member: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """[M] -> [M, 1, ...] so it broadcasts against a stacked tensor."""
    return per_member.view(-1, *([1] * (like.dim() - 1)))
