"""Resampling dead features of L1 members (relu, tied), inside the stacked tensors of an ensemble.

Anthropic's "Towards Monosemanticity" (2023) and dictionary_learning's StandardTrainer
(`resample_steps`, trainers/standard.py: resample_neurons) re-initialise features that stopped firing:
every `resample_every` steps a member's features that fired in none of the last resample_every / 2
steps' rows are each given an input drawn from the current batch with probability proportional to
its reconstruction error ||x - x_hat||, as
    W_enc row = x * 0.2 * mean norm of the live encoder rows,   W_dec row = x / ||x||,   b_enc = 0,
and their Adam moments (W_enc, b_enc, W_dec rows) are zeroed. Members are independent: each uses
only its own rows, moments and a generator seeded by (its seed, the step), so a member resamples the
same in any ensemble and after a resume (its rows-since-fired counter is saved with its moments).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ENCODER_SCALE = 0.2  # dictionary_learning's: a resampled encoder row starts at 0.2 x the live rows' mean norm
ROWS = ("W_enc", "b_enc", "W_dec")  # the per-feature params a resample rewrites (and whose moments it resets)


def due(ensemble) -> list[int]:
    """Members whose resample step this is (step_count counts the steps done)."""
    step = ensemble.step_count
    return [i for i, m in enumerate(ensemble.members) if m.resample_every and step > 0 and step % m.resample_every == 0]


@torch.no_grad()
def resample_dead_(ensemble, batch: torch.Tensor, members: list[int]) -> dict[int, int]:
    """Resample the dead features of `members` from `batch` [B, d] in place; returns {member index: features
    resampled}."""
    _, x_hat = ensemble.forward(batch)  # [M, B, d]
    errors = (batch - x_hat).norm(dim=-1).float().cpu()  # [M, B]
    resampled = {}
    for i in members:
        member = ensemble.members[i]
        n = member.dict_size
        quiet_rows = member.resample_every // 2 * batch.shape[0]
        dead = (ensemble.tokens_since_fired[i, :n] > quiet_rows).nonzero().flatten()
        count = min(len(dead), batch.shape[0])
        if count == 0 or not torch.isfinite(errors[i]).all() or errors[i].sum() <= 0:
            resampled[i] = 0
            continue
        generator = torch.Generator().manual_seed(member.seed * 1_000_003 + ensemble.step_count)
        rows = torch.multinomial(errors[i], count, replacement=False, generator=generator).to(batch.device)
        dead = dead[:count]  # dictionary_learning resamples the first ones when there are more dead than rows
        sampled = batch[rows].float()  # [count, d]
        W_enc = ensemble.params["W_enc"][i]
        alive = torch.ones(n, dtype=torch.bool, device=W_enc.device)
        alive[dead] = False
        live_norm = W_enc[:n][alive].norm(dim=-1).mean() if alive.any() else torch.tensor(1.0, device=W_enc.device)
        W_enc[dead] = sampled * live_norm * ENCODER_SCALE
        ensemble.params["W_dec"][i][dead] = F.normalize(sampled, dim=-1)
        ensemble.params["b_enc"][i][dead] = 0.0
        for moments in (ensemble.opt_state.mu, ensemble.opt_state.nu):
            for name in ROWS:
                moments[name][i][dead] = 0.0
        ensemble.tokens_since_fired[i, dead] = 0.0
        resampled[i] = count
    return resampled
