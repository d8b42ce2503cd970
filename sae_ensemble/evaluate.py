"""Splice SAE reconstructions into the language model: CE loss recovered and KL.

The model runs through TransformerLens 4's `TransformerBridge`
(`TransformerBridge.boot_transformers(name_or_dir, device=...)`). For each batch of
tokens it runs once clean, once with the hooked activation zero-ablated, and then
with the activation replaced by each member's reconstruction. Members are batched:
the tokens are repeated `members_per_pass` times along the batch axis and the hook
hands each copy to a different member, so one forward pass evaluates many members.

    ce_recovered = ce_loss_score = (CE_zero - CE_recon) / (CE_zero - CE_clean)
    kl_div_score = (KL_zero - KL_recon) / KL_zero          (KL of the clean next-token distribution)
1 means the reconstruction loses nothing; 0 means it is as bad as deleting the activation.
`ce_loss_score` and `kl_div_score` are SAELens's names (sae_lens.evals); `ce_recovered` stays
as our name for the same number. When zero-ablation raises CE by less than `min_ce_gap` nats
(a random model, a hook the model ignores), both scores are NaN with a one-line warning: the
ratio of two differences near zero is noise. ce_clean, ce_zero_ablation and ce_recon are kept.

Transcoders (`input_hook`): the member reads the activation at `input_hook` of the same forward pass and its
output replaces the activation at `hook_name`, which runs later; zero-ablation is of `hook_name`'s activation.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sae_ensemble import architectures
from sae_ensemble.checkpoint import load_member
from sae_ensemble.rundir import MemberDir, read_json

Reconstruction = Callable[[torch.Tensor], torch.Tensor]  # x [..., d] -> x_hat [..., d] (transcoders: [..., d_out])
MIN_CE_GAP = 0.05
"""Nats by which zero-ablation must raise CE for ce_recovered / kl_div_score to be reported (else NaN).
CE means over a few thousand held-out tokens differ by noise of order 0.01 nats between runs of
the same model; a gap of 0.05 keeps that noise under ~20% of the score's denominator."""


# -- reconstructions from saved members ----------------------------------------------------------


def reconstruction_from_checkpoint(
    directory: str | Path, normalization: tuple[torch.Tensor, float] | None = None, device: str | torch.device = "cpu"
) -> Reconstruction:
    """x -> x_hat of a saved member (`members/<id>/`); a transcoder's: its input -> its predicted output.

    `normalization` = (shift [d], scale) when the SAE was trained on a normalised store
    (`ActivationStore.normalization(mode)`): activations are mapped into the SAE's space
    as (x - shift) / scale and the reconstruction is mapped back. Transcoders train unnormalised.
    """
    member, params, _, _ = load_member(directory)
    if member.d_out and normalization is not None:
        raise ValueError(f"{member.member_id} is a transcoder, trained on unnormalised rows; got a normalization")
    params = {name: value.to(device) for name, value in params.items()}
    architecture = architectures.module_of(member.variant)
    hp = {name: value.to(device) for name, value in architectures.make_hparams(member).items()}
    layout = architecture.layout([member])  # static code-path choices for this one member
    shift, scale = (torch.zeros(member.d_in), 1.0) if normalization is None else normalization
    shift = torch.as_tensor(shift, dtype=torch.float32, device=device)
    if shift.shape != (member.d_in,):
        raise ValueError(
            f"normalization shift has shape {list(shift.shape)}; expected [{member.d_in}] for {member.member_id}"
        )

    @torch.no_grad()
    def reconstruct(x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != member.d_in:
            raise ValueError(
                f"activations have width {x.shape[-1]}; member {member.member_id} expects d_in={member.d_in}"
            )
        rows = (x.reshape(-1, member.d_in).float() - shift) / scale  # [rows, d] in the SAE's space
        codes = architecture.encode(params, hp, rows, layout)
        if member.d_out:  # a transcoder's prediction of its output activation (skip transcoders read rows too)
            return architecture.decode(params, hp, codes, layout, rows).reshape(*x.shape[:-1], -1).to(x.dtype)
        x_hat = architecture.decode(params, hp, codes, layout)
        return (x_hat * scale + shift).reshape(x.shape).to(x.dtype)

    return reconstruct


# -- CE loss recovered ---------------------------------------------------------------------------


def _next_token_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """[batch, ctx - 1, vocab] log-probabilities at the positions that have a next token."""
    return F.log_softmax(logits[:, :-1].float(), dim=-1)


def _ce_sum(log_probs: torch.Tensor, tokens: torch.Tensor) -> float:
    targets = tokens[:, 1:].to(log_probs.device)
    return float(-log_probs.gather(-1, targets.unsqueeze(-1)).sum())


def _kl_sum(clean: torch.Tensor, other: torch.Tensor) -> float:
    """Sum over positions of KL(clean || other) of next-token distributions."""
    return float((clean.exp() * (clean - other)).sum())


@torch.no_grad()
def ce_loss_recovered(
    bridge,
    tokens: torch.Tensor,
    hook_name: str,
    reconstructions: Reconstruction | Sequence[Reconstruction],
    batch_size: int = 8,
    members_per_pass: int = 8,
    progress: bool = True,
    skip_first_position: bool = False,
    min_ce_gap: float = MIN_CE_GAP,
    input_hook: str | None = None,
) -> list[dict[str, float]]:
    """One dict per reconstruction: ce_clean, ce_zero_ablation, ce_recon, ce_recovered, ce_loss_score,
    kl, kl_zero_ablation, kl_div_score (module docstring; the scores are NaN below `min_ce_gap`).

    tokens [N, ctx] are run `batch_size` sequences at a time; CE and KL are means over
    every predicted position (all positions but the last of each sequence).
    `skip_first_position` leaves position 0 (BOS) untouched in the spliced and ablated runs,
    for SAEs trained on stores that dropped it. `input_hook`: the reconstructions are transcoders reading it
    (the module doc).
    """
    if callable(reconstructions):
        reconstructions = [reconstructions]
    reconstructions = list(reconstructions)
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens has shape {list(tokens.shape)}; expected [batch, ctx] with ctx >= 2")
    if batch_size < 1 or members_per_pass < 1:
        raise ValueError(f"batch_size={batch_size} and members_per_pass={members_per_pass} must both be at least 1")
    for name in (hook_name, input_hook or hook_name):
        if name not in bridge.hook_dict:
            raise ValueError(f"hook {name!r} is not a hook point of this model; e.g. {sorted(bridge.hook_dict)[:5]}")

    def keep(x: torch.Tensor, replaced: torch.Tensor) -> torch.Tensor:
        """The replacement, but position 0 left as it was when the SAE never trained on it (BOS)."""
        if not skip_first_position:
            return replaced
        return torch.cat([x[:, :1], replaced[:, 1:]], dim=1)

    n_members = len(reconstructions)
    groups = [
        list(range(start, min(start + members_per_pass, n_members))) for start in range(0, n_members, members_per_pass)
    ]
    batches = list(torch.split(tokens, batch_size))
    ce_clean = ce_zero = kl_zero = 0.0
    ce_recon = [0.0] * n_members
    kl = [0.0] * n_members
    positions = 0

    bar = tqdm(total=len(batches) * (2 + len(groups)), desc="CE loss recovered", disable=not progress)
    for batch in batches:
        clean = _next_token_log_probs(bridge(batch))
        bar.update()
        zero = _next_token_log_probs(
            bridge.run_with_hooks(batch, fwd_hooks=[(hook_name, lambda x, hook: keep(x, torch.zeros_like(x)))])
        )
        bar.update()
        ce_clean += _ce_sum(clean, batch)
        ce_zero += _ce_sum(zero, batch)
        kl_zero += _kl_sum(clean, zero)
        positions += clean.shape[0] * clean.shape[1]

        for group in groups:
            inputs: list[torch.Tensor] = []  # a transcoder's input, kept from earlier in the same pass

            # Copy c of the repeated batch is member group[c]'s: x [copies * b, ctx, d] -> per-copy chunks.
            def splice(x: torch.Tensor, hook, group=group, inputs=inputs) -> torch.Tensor:
                chunks = (inputs.pop() if input_hook else x).chunk(len(group), dim=0)
                return keep(x, torch.cat([reconstructions[m](chunk) for m, chunk in zip(group, chunks)], dim=0))

            hooks = [(input_hook, lambda x, hook, inputs=inputs: inputs.append(x))] if input_hook else []
            logits = bridge.run_with_hooks(batch.repeat(len(group), 1), fwd_hooks=[*hooks, (hook_name, splice)])
            for m, recon in zip(group, _next_token_log_probs(logits).chunk(len(group), dim=0)):
                ce_recon[m] += _ce_sum(recon, batch)
                kl[m] += _kl_sum(clean, recon)
            bar.update()
    bar.close()

    clean_mean, zero_mean, kl_zero_mean = ce_clean / positions, ce_zero / positions, kl_zero / positions
    gap = zero_mean - clean_mean
    scored = gap >= min_ce_gap and gap != 0 and kl_zero_mean > 0  # -inf scores any nonzero gap (tests of the formulas)
    if not scored:
        print(
            f"warning: zero-ablating {hook_name} raises CE by only {gap:.4f} nats (< min_ce_gap={min_ce_gap}); "
            f"ce_recovered, ce_loss_score and kl_div_score are NaN, since that ratio would be noise",
            file=sys.stderr,
        )
    results = []
    for m in range(n_members):
        recon_mean, kl_mean = ce_recon[m] / positions, kl[m] / positions
        score = (zero_mean - recon_mean) / gap if scored else float("nan")
        results.append(
            {
                "ce_clean": clean_mean,
                "ce_zero_ablation": zero_mean,
                "ce_recon": recon_mean,
                "ce_recovered": score,
                "ce_loss_score": score,
                "kl": kl_mean,
                "kl_zero_ablation": kl_zero_mean,
                "kl_div_score": (kl_zero_mean - kl_mean) / kl_zero_mean if scored else float("nan"),
            }
        )
    return results


def evaluate_members(
    bridge,
    tokens: torch.Tensor,
    hook_name: str,
    member_dirs: Sequence[str | Path],
    normalization: tuple[torch.Tensor, float] | None = None,
    **kwargs,
) -> dict[str, dict[str, float]]:
    """member_id -> CE metrics for saved members (directories `members/<id>/`)."""
    device = next(bridge.parameters()).device
    reconstructions = [reconstruction_from_checkpoint(d, normalization, device) for d in member_dirs]
    ids = [read_json(MemberDir(d).cfg)["member_id"] for d in member_dirs]
    return dict(zip(ids, ce_loss_recovered(bridge, tokens, hook_name, reconstructions, **kwargs)))
