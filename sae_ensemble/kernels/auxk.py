"""AuxK inside the sparse kernel: sae.auxk_loss's value and gradients, chunk by chunk, without autograd.

Per member, the k_aux largest pre-activations among its dead latents (unrectified; ranks past min(k_aux, n_dead)
hold 0) reconstruct the detached residual through the unit-norm dictionary, scaled by the coefficient and
min(n_dead / k_aux, 1). Two ways to run it, equal to the reference and to each other (tests/test_kernels.py):
- `DeadColumns` (CPU): the dead latents' ids are read on the host once per step, and the loss runs densely
  on the [M, b, w] pre-activations of those w columns (w = the most dead latents of any member). Dead latents
  are few, so its batched GEMMs are small, and it needs no sparse product; its selection (k_aux of w, k_aux
  near w) is a mask from native.keep_largest where the C kernels run, else torch.topk;
- `AllColumns` (CUDA: no host read, static shapes): the selection runs over every column with the live ones
  at -inf, and its k_aux entries per row form a second sparse pattern through the sparse kernel's products.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_ensemble.kernels import native
from sae_ensemble.kernels.common import native_path, row_topk
from sae_ensemble.kernels.patterns import fixed_k, transposed
from sae_ensemble.sae import Hparams, Layout


def for_step(hp: Hparams, layout: Layout, B: int, o: int, device: torch.device) -> DeadColumns | AllColumns | None:
    """The AuxK of this step's sparse gradient, or None where it adds nothing: no member has AuxK, or (read on the
    host, CPU only) no member has a dead latent."""
    if not layout.k_aux:
        return None
    if device.type == "cuda":
        return AllColumns(hp, layout, B, o)
    return DeadColumns(hp, layout, B, o) if bool(hp["dead"].any()) else None


class _Loss:
    """What both ways share: per-member scale, kept ranks and the accumulated loss [M]."""

    def __init__(self, hp: Hparams, layout: Layout, B: int, o: int) -> None:
        self.hp, self.k = hp, layout.k_aux
        self.n_dead = n_dead = hp["dead"].sum(-1)  # [M]
        self.kept_ranks = torch.minimum(hp["k_aux"], n_dead)  # [M]
        # d(loss)/d(recon - residual) = 2 * coefficient * min(n_dead / k_aux, 1) / (B o) * (recon - residual)
        self.scale = hp["auxk_coefficient"] * torch.clamp(n_dead / hp["k_aux"], max=1.0)  # [M]
        self.loss = torch.zeros_like(n_dead)
        self.mean_of = 1.0 / (B * o)

    def error_gradient(self, recon: torch.Tensor, err: torch.Tensor) -> torch.Tensor:
        """Add the chunk's loss; return dL/drecon [M, b, o]. `err` = output - target, so the detached residual
        is -err and recon - residual = recon + err."""
        diff = recon + err
        self.loss += self.scale * self.mean_of * diff.pow(2).sum((1, 2))
        return diff.mul_((2.0 * self.mean_of * self.scale).view(-1, 1, 1))

    def kept(self, values: torch.Tensor) -> torch.Tensor:
        """[M, 1, k] bool: the ranks each member keeps of the sorted selection `values` [M, b, k]."""
        return torch.arange(values.shape[-1], device=values.device) < self.kept_ranks.view(-1, 1, 1)


class DeadColumns(_Loss):
    """AuxK over the dead latents' columns alone, densely (module doc)."""

    def __init__(self, hp: Hparams, layout: Layout, B: int, o: int) -> None:
        super().__init__(hp, layout, B, o)
        width = int(self.n_dead.max())
        self.live, self.ids = torch.topk(hp["dead"], width, dim=-1)  # [M, w]: the dead first (1.0), then padding
        # every member keeps all its dead latents: the selection is the mask, no top-k
        self.keeps_all = bool((self.n_dead <= hp["k_aux"]).all())
        self.k = min(self.k, width)
        self.W_dead: torch.Tensor | None = None  # [M, w, d_aug]: the dead latents' augmented encoder rows

    def select(self, pre: torch.Tensor, xc_aug: torch.Tensor, W_aug: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, kept) [M, b, w]: the selected pre-activations at the dead columns (0 elsewhere) and where the
        gradient passes (1.0). The dead columns' pre-activations come from their own GEMM of the chunk's augmented
        rows xc_aug [M, b, d_aug] and encoder W_aug (the bias rides in it): reading them out of `pre` touched
        scattered cache lines of every row (1.4 ms a step, against ~0.5 for the GEMM)."""
        if self.W_dead is None:  # the step's encoder is fixed: its dead rows once per step
            self.W_dead = W_aug.gather(1, self.ids.unsqueeze(-1).expand(-1, -1, W_aug.shape[-1]))
        candidates = torch.bmm(xc_aug, self.W_dead.transpose(1, 2))  # [M, b, w]
        if self.keeps_all:
            live = self.live.unsqueeze(1) > 0
            return torch.where(live, candidates, 0.0), live.expand_as(candidates).to(pre.dtype)
        if native_path(pre.device.type, pre.dtype):
            return native.keep_largest(candidates, self.live, self.kept_ranks)
        live = self.live.unsqueeze(1) > 0
        values, at = row_topk(torch.where(live, candidates, -torch.inf), self.k)
        kept = self.kept(values)
        codes = torch.zeros_like(candidates).scatter_(-1, at, torch.where(kept, values, 0.0))  # never -inf * 0
        return codes, torch.zeros_like(candidates).scatter_(-1, at, kept.expand_as(values).to(pre.dtype))

    def backward(self, selection, err, D_flat, g_D, g_W_enc, g_pre_sum, centred) -> None:
        """Add this chunk's AuxK loss, and its gradients to g_D, g_W_enc [M·n, ·] and g_pre_sum [M·n]."""
        codes, kept = selection
        M, b, o = err.shape
        n = D_flat.shape[0] // M
        columns = (self.ids + (torch.arange(M, device=err.device) * n).view(-1, 1)).reshape(-1)  # [M w]
        D_dead = D_flat[columns].view(M, -1, o)  # [M, w, o]
        g_recon = self.error_gradient(torch.bmm(codes, D_dead), err)
        g_pre = torch.bmm(g_recon, D_dead.mT).mul_(kept)  # [M, b, w]
        g_D.index_add_(0, columns, torch.bmm(codes.mT, g_recon).view(-1, o))
        g_W_enc.index_add_(0, columns, torch.bmm(g_pre.mT, centred).view(-1, centred.shape[-1]))
        g_pre_sum.index_add_(0, columns, g_pre.sum(1).view(-1))


class AllColumns(_Loss):
    """AuxK as a second sparse pattern of k_aux entries per row (module doc)."""

    def select(self, pre: torch.Tensor, xc_aug: torch.Tensor, W_aug: torch.Tensor):
        """The Active entries of the selection (patterns.fixed_k), `kept` marking the ranks kept (from `pre`, the
        chunk's pre-activations; the other arguments serve DeadColumns)."""
        candidates = torch.where(self.hp["dead"].unsqueeze(1) > 0, pre, -torch.inf)
        values, indices = torch.topk(candidates, self.k, dim=-1)  # [M, b, k_aux]
        kept = self.kept(values)
        return fixed_k(torch.where(kept, values, 0.0), indices, kept, pre.shape[-1])

    def backward(self, dead, err, D_flat, g_D, g_W_enc, g_pre_sum, centred) -> None:
        """As DeadColumns.backward, through the sparse kernel's four products at the selection's entries."""
        M, b, o = err.shape
        k = self.k
        recon = F.embedding_bag(
            dead.columns.view(M * b, k), D_flat, per_sample_weights=dead.values.view(M * b, k), mode="sum"
        )
        g_recon = self.error_gradient(recon.view(M, b, o), err).view(M * b, o)
        pattern = torch.sparse_csr_tensor(
            dead.crow, dead.columns, dead.values, size=(M * b, g_D.shape[0]), check_invariants=False
        )
        g_pre = torch.sparse.sampled_addmm(pattern, g_recon, D_flat.T, beta=0.0).values() * dead.kept
        by_column = transposed(dead.rows, dead.columns, M * b, g_D.shape[0])
        g_D += torch.sparse.mm(by_column(dead.values), g_recon)
        g_W_enc += torch.sparse.mm(by_column(g_pre), centred.reshape(M * b, -1))
        g_pre_sum.index_add_(0, dead.columns, g_pre)
