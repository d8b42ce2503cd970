"""How good is each SAE: reconstruction, sparsity, dead features and dictionary similarity.

Pure torch, vectorised over the ensemble's member axis. Shapes:
    x            [B, d]           the batch every member saw
    x_hat        [M, B, d]        each member's reconstruction
    codes        [M, B, n]        feature activations, n = the ensemble's padded dict size
    feature_mask [M, n]           1.0 for a member's real features, 0.0 for padding

Padded features never count: they are masked out of L0, L1, dead fraction and MMCS.

MMCS (mean max cosine similarity) has exactly one implementation, `_max_cos`;
`mmcs`, `mmcs_truth` and `mmcs_between` are ways of choosing which dictionaries to
compare. Its direction matters (it is not symmetric): `mmcs(a, b)` is the mean over
a's rows of the best match among b's rows, i.e. "how well is a found in b".
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import fields

import torch
import torch.nn.functional as F

from sae_ensemble.member import Member

# -- reconstruction and sparsity -----------------------------------------------------------------


def reconstruction_metrics(
    x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor, feature_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Per-member reconstruction and sparsity metrics on one batch, each a tensor [M].

    mse    mean squared error over all elements (SAELens's `mse` sums over dimensions: d_in x ours)
    fvu    fraction of variance unexplained: sum of squared error / sum of squared
           deviation of x from its per-dimension batch mean (0 = perfect, 1 = as good as the mean)
    explained_variance  1 - fvu (SAELens's definition: 1 - E||x - x_hat||^2 / total variance)
    l0     mean number of active (> 0) real features per row
    l1     mean L1 norm of a row's real feature activations (SAELens's `l1`)
    cossim mean over rows of cos(x, x_hat)
    l2_ratio  mean over rows of ||x_hat|| / ||x|| (rows with ||x|| < 1e-4 divide by 1, as SAELens does)
    relative_reconstruction_bias  E||x_hat||^2 / E<x, x_hat> (Gemma Scope eq. 10): 1 = no shrinkage
    """
    return _metrics_from_sums(_reconstruction_sums(x, x_hat, codes, feature_mask))


def heldout_metrics(
    x: torch.Tensor,
    forward: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    feature_mask: torch.Tensor,
    rows_per_part: int,
    target_at: int = 0,
    observe: Callable[[torch.Tensor, int], None] | None = None,
) -> dict[str, torch.Tensor]:
    """`reconstruction_metrics` over all of x [R, d], `rows_per_part` rows at a time; transcoders' rows are
    [input | target] and their outputs are scored against the target, from column `target_at` on.

    `forward(rows)` gives (codes [M, b, n], x_hat [M, b, d]). Sums are added over parts and the
    ratios (fvu, relative_reconstruction_bias) formed once at the end, so the result equals one
    call on all rows while only a part's codes are in memory. `observe(codes, first_row)` sees each part's codes
    too (the ground-truth detection scores, in the same pass).
    """
    total: dict[str, torch.Tensor] = {}
    for start, rows in zip(range(0, len(x), rows_per_part), x.split(rows_per_part)):
        codes, x_hat = forward(rows)
        if observe is not None:
            observe(codes, start)
        target = rows[:, target_at:] if target_at else rows
        for name, value in _reconstruction_sums(target, x_hat, codes, feature_mask).items():
            total[name] = total[name] + value if name in total else value
    return _metrics_from_sums(total)


def _reconstruction_sums(
    x: torch.Tensor, x_hat: torch.Tensor, codes: torch.Tensor, feature_mask: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Sums over rows that every metric of `reconstruction_metrics` is a function of (float64, so they add exactly
    enough)."""
    if x_hat.dim() != 3 or x_hat.shape[1:] != x.shape:
        raise ValueError(f"x_hat has shape {list(x_hat.shape)}; expected [M, {x.shape[0]}, {x.shape[1]}] to match x")
    if codes.shape[:2] != x_hat.shape[:2] or feature_mask.shape != (codes.shape[0], codes.shape[2]):
        raise ValueError(
            f"codes {list(codes.shape)} and feature_mask {list(feature_mask.shape)} must be [M, B, n] and [M, n] "
            f"with M={x_hat.shape[0]}, B={x.shape[0]}"
        )
    x, x_hat, codes = x.float(), x_hat.float(), codes.float()
    mask = feature_mask.float().unsqueeze(1)  # [M, 1, n]
    x_norm = x.norm(dim=-1)  # [B]
    x_hat_norm = x_hat.norm(dim=-1)  # [M, B]
    dot = (x_hat * x).sum(-1)  # [M, B]
    return {
        "rows": torch.tensor(float(x.shape[0]), dtype=torch.float64, device=x.device),
        "elements": torch.tensor(float(x.numel()), dtype=torch.float64, device=x.device),
        "x_sum": x.double().sum(0),  # [d]
        "x_sq": x.double().pow(2).sum(),
        "sq_err": (x_hat - x).pow(2).sum((1, 2)).double(),  # [M]
        "l0": ((codes > 0).float() * mask).sum((1, 2)).double(),
        "l1": (codes.abs() * mask).sum((1, 2)).double(),
        "cossim": (dot / (x_hat_norm * x_norm).clamp(min=torch.finfo(x.dtype).tiny)).sum(-1).double(),
        "l2_ratio": (x_hat_norm / torch.where(x_norm < 1e-4, 1.0, x_norm)).sum(-1).double(),
        "x_hat_sq": x_hat_norm.pow(2).sum(-1).double(),
        "x_dot_x_hat": dot.sum(-1).double(),
    }


def _metrics_from_sums(s: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    rows = s["rows"]
    # Total variance from sums, in float64: a difference of two large, nearly equal numbers when x has a big mean.
    variance = s["x_sq"] - s["x_sum"].pow(2).sum() / rows  # a constant batch has none: FVU would be 0/0
    fvu = s["sq_err"] / variance.clamp(min=torch.finfo(torch.float32).tiny)
    out = {
        "mse": s["sq_err"] / s["elements"],
        "fvu": fvu,
        "explained_variance": 1.0 - fvu,
        "l0": s["l0"] / rows,
        "l1": s["l1"] / rows,
        "cossim": s["cossim"] / rows,
        "l2_ratio": s["l2_ratio"] / rows,
        "relative_reconstruction_bias": s["x_hat_sq"] / s["x_dot_x_hat"],
    }
    return {name: value.float() for name, value in out.items()}


# -- dead features -------------------------------------------------------------------------------


class FiringCounter:
    """Per-feature fire counts over a long sliding window of tokens, for every member.

    Design: a ring of `n_blocks` completed blocks of about `window_tokens / n_blocks`
    tokens each, plus the block being filled. A batch is added whole to the current
    block; when that block holds a block's worth of tokens it joins the ring and the
    oldest block drops out. So the counts always cover every token of the last
    `window_tokens` (once that many have been seen) and at most one block plus one
    batch more: a feature reported dead truly never fired in the last `window_tokens`
    tokens. A reset-at-window scheme would instead report almost everything alive
    just after each reset, the short-window illusion the seeds warned about.
    Before `window_tokens` tokens have been seen, the counts cover everything seen.
    """

    def __init__(
        self, n_members: int, n_padded: int, window_tokens: int, device: str | torch.device = "cpu", n_blocks: int = 8
    ) -> None:
        if window_tokens < 1 or n_blocks < 1:
            raise ValueError(f"window_tokens={window_tokens} and n_blocks={n_blocks} must both be at least 1")
        self.window_tokens = int(window_tokens)
        self.n_blocks = int(n_blocks)
        self.block_tokens = max(1, -(-self.window_tokens // self.n_blocks))  # ceil: n_blocks blocks span the window
        # int64 counts: exact however long the window (float32 stops counting at 2**24).
        self.blocks = torch.zeros(self.n_blocks, n_members, n_padded, dtype=torch.int64, device=device)  # ring
        self.block_token_counts = torch.zeros(self.n_blocks, dtype=torch.int64)
        self.current = torch.zeros(n_members, n_padded, dtype=torch.int64, device=device)
        self.current_tokens = 0
        self.next_slot = 0  # ring slot the next completed block overwrites (the oldest)

    def update(self, fired: torch.Tensor, n_tokens: int) -> None:
        """Add one batch: `fired` [M, n] = rows of the batch in which each feature was > 0."""
        if fired.shape != self.current.shape:
            raise ValueError(
                f"fired has shape {list(fired.shape)}; expected {list(self.current.shape)} [members, n_padded]"
            )
        self.current += fired.detach().round().to(torch.int64)
        self.current_tokens += int(n_tokens)
        if self.current_tokens >= self.block_tokens:
            self.blocks[self.next_slot] = self.current
            self.block_token_counts[self.next_slot] = self.current_tokens
            self.next_slot = (self.next_slot + 1) % self.n_blocks
            self.current = torch.zeros_like(self.current)
            self.current_tokens = 0

    def counts(self) -> torch.Tensor:
        """Fire counts [M, n] over the window (the ring plus the current block)."""
        return self.blocks.sum(0) + self.current

    def tokens(self) -> int:
        """Tokens the window's counts cover."""
        return int(self.block_token_counts.sum()) + self.current_tokens

    def frequencies(self) -> torch.Tensor:
        """Firing frequency [M, n]: fraction of the window's tokens on which each feature fired."""
        return self.counts().double().div(max(self.tokens(), 1)).float()

    def dead_fraction(self, feature_mask: torch.Tensor) -> torch.Tensor:
        """[M] fraction of each member's real features that never fired in the window."""
        mask = feature_mask.to(self.current.device) > 0
        dead = (self.counts() == 0) & mask
        return dead.sum(-1).float() / mask.sum(-1).clamp(min=1).float()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Plain tensors, to checkpoint with the ensemble and resume the same window."""
        return {
            "blocks": self.blocks.cpu(),
            "block_token_counts": self.block_token_counts.clone(),
            "current": self.current.cpu(),
            "scalars": torch.tensor([self.current_tokens, self.next_slot, self.window_tokens], dtype=torch.int64),
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if tuple(state["blocks"].shape) != tuple(self.blocks.shape):
            raise ValueError(
                f"saved firing counts have shape {list(state['blocks'].shape)}; this counter has "
                f"{list(self.blocks.shape)}"
            )
        device = self.current.device
        self.blocks = state["blocks"].to(device, torch.int64)
        self.block_token_counts = state["block_token_counts"].to(torch.int64).clone()
        self.current = state["current"].to(device, torch.int64)
        self.current_tokens, self.next_slot, _ = (int(v) for v in state["scalars"])


# -- dictionary similarity (MMCS) ----------------------------------------------------------------


_MAX_COS_ELEMENTS = 1 << 26  # similarities computed at once (256 MB of float32)


def _max_cos(
    dictionary: torch.Tensor, reference: torch.Tensor, reference_mask: torch.Tensor | None = None
) -> torch.Tensor:
    """For each row of `dictionary` [..., n_a, d]: max cosine similarity to a row of `reference` [..., n_b, d].

    Rows of the reference where `reference_mask` [..., n_b] is 0 (padding) are never a match.
    The single implementation of the MMCS formula; returns [..., n_a].
    """
    reference = F.normalize(reference.float(), dim=-1).transpose(-1, -2)  # [..., d, n_b]
    # Chunk the dictionary's rows so the similarity matrix stays small (two 32k dicts: 4 GB at once).
    rows_per_chunk = max(1, _MAX_COS_ELEMENTS // max(1, reference[..., 0, :].numel()))
    best = []
    for chunk in F.normalize(dictionary.float(), dim=-1).split(rows_per_chunk, dim=-2):
        cos = chunk @ reference  # [..., chunk, n_b]
        if reference_mask is not None:
            cos = cos.masked_fill(reference_mask.unsqueeze(-2) <= 0, float("-inf"))
        best.append(cos.max(-1).values)
    return torch.cat(best, dim=-1)


def mmcs(dictionary: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over `dictionary`'s rows [n_a, d] of the max cosine similarity to any row of `reference` [n_b, d]."""
    if dictionary.dim() != 2 or reference.dim() != 2 or dictionary.shape[1] != reference.shape[1]:
        raise ValueError(
            f"dictionary {list(dictionary.shape)} and reference {list(reference.shape)} must be [n, d] with equal d"
        )
    return float(_max_cos(dictionary, reference).mean())


def mmcs_truth(decoders: torch.Tensor, feature_mask: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[M] recovery of the ground truth: for each true feature, the max cos sim to any of the member's real features,
    averaged.

    Direction: truth vs learned, mmcs(truth, member), as in the seeds. It asks "is every
    true feature found?". The other direction scores the member's own features instead,
    so a dictionary that matches one true feature many times and misses the rest could
    score 1, while a larger dictionary's spare (dead or split) features lower it.
    decoders [M, n, d], feature_mask [M, n], truth [F, d].
    """
    if decoders.dim() != 3 or truth.dim() != 2 or decoders.shape[-1] != truth.shape[-1]:
        raise ValueError(
            f"decoders {list(decoders.shape)} and truth {list(truth.shape)} must be [M, n, d] and [F, d] with equal d"
        )
    truth = truth.to(decoders.device).expand(decoders.shape[0], *truth.shape)  # [M, F, d]
    return _max_cos(truth, decoders, feature_mask).mean(-1)


def relative_error(learned: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[M] ||learned_m - truth||_F / ||truth||_F of each member's learned matrix (a skip transcoder's W_skip
    [M, d_out, d_in]) against the true one [d_out, d_in]."""
    if learned.shape[1:] != truth.shape:
        raise ValueError(f"learned {list(learned.shape)} must be [M, *{list(truth.shape)}]")
    return (learned.float() - truth.float()).flatten(1).norm(dim=1) / truth.float().norm()


PAIRINGS = ("next_size", "seed")


def mmcs_between(
    members: Sequence[Member],
    decoders: Mapping[str, torch.Tensor],
    pairing: str = "next_size",
    of: Collection[str] | None = None,
) -> dict[str, float]:
    """MMCS of each member's dictionary against its partners; members without a partner are absent.

    pairing="next_size": the partner is the member with the next larger dict size and every
        other hyperparameter equal (the seeds' "small dict vs the next larger one");
        the value is mmcs(this member, that member).
    pairing="seed": partners are all members equal but for the seed; the value is the mean of
        mmcs(this member, partner) over partners (stability across initialisations).
    `decoders` maps member_id to that member's unpadded dictionary [dict_size, d]; a lazy mapping
    (read on access) keeps only the pair compared in memory. `of`: the member ids whose values are
    wanted (default all); their partners come from all of `members`.
    """
    for member in members:
        if member.member_id not in decoders:
            raise ValueError(f"no decoder given for member {member.member_id}")
    wanted = {m.member_id for m in members} if of is None else set(of)
    result: dict[str, float] = {}
    for member_id, partners in partners_of(members, pairing).items():
        if member_id in wanted:
            own = decoders[member_id]
            result[member_id] = sum(mmcs(own, decoders[p.member_id]) for p in partners) / len(partners)
    return result


def partners_of(members: Sequence[Member], pairing: str = "next_size") -> dict[str, list[Member]]:
    """member_id -> its partners (mmcs_between's pairings); members without one are absent."""
    if pairing not in PAIRINGS:
        raise ValueError(f"pairing={pairing!r} is unknown; allowed: {', '.join(PAIRINGS)}")
    varied = "dict_size" if pairing == "next_size" else "seed"
    others = [f.name for f in fields(Member) if f.name != varied]
    groups: dict[tuple, list[Member]] = defaultdict(list)
    for member in members:
        groups[tuple(getattr(member, name) for name in others)].append(member)
    result: dict[str, list[Member]] = {}
    for group in groups.values():
        group = sorted(group, key=lambda m: getattr(m, varied))
        for index, member in enumerate(group):
            if pairing == "next_size":
                partners = [m for m in group[index + 1 :] if m.dict_size > member.dict_size][:1]
            else:
                partners = [m for m in group if m is not member]
            if partners:
                result[member.member_id] = partners
    return result
