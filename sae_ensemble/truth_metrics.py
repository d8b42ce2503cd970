"""Scores of a dictionary against a synthetic world's ground truth beyond mmcs_truth (#37), as SAELens' synthetic
evaluations define them (sae_lens.synthetic.evals, SynthSAEBench), so the numbers compare across the two tools:

    mcc          the Hungarian-matched mean |cosine| between decoder rows and true directions: a one-to-one
                 matching (scipy's linear_sum_assignment), so a latent counts for one true feature at most
    uniqueness   distinct true features that are some latent's best match / number of latents: 1 when no two
                 latents track the same feature
    precision, recall, f1
                 each latent as a detector of its best-matching true feature (by decoder cosine) on rows with
                 known true codes: fires (code != 0) vs the feature fires (true code > 0); per latent, then
                 the mean over latents (0 where undefined)

    absorption   hierarchical worlds: for each parent feature (one with children), over rows where it fires, the
                 share where its latent (the latent closest to it) stays silent while the latent closest to one of
                 its firing children fires: the child's latent took the parent's place (Chanin et al. 2024, "A is
                 for Absorption"); the mean over parents that fired

Inputs are one member's real latents (padding dropped): decoder [n, d] rows, truth [F, d] rows, codes [R, n],
true codes [R, F]. metrics.mmcs_truth stays the seeds' recovery score.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def _abs_cosines(decoder: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    if decoder.dim() != 2 or truth.dim() != 2 or decoder.shape[1] != truth.shape[1]:
        raise ValueError(f"decoder {list(decoder.shape)} and truth {list(truth.shape)} must be [n, d] and [F, d]")
    return (F.normalize(decoder.float(), dim=-1) @ F.normalize(truth.float(), dim=-1).T).abs()  # [n, F]


def mcc(decoder: torch.Tensor, truth: torch.Tensor) -> float:
    """Mean |cosine| of the optimal one-to-one matching of decoder rows and true directions (module doc)."""
    from scipy.optimize import linear_sum_assignment

    cosines = _abs_cosines(decoder, truth).cpu().double().numpy()
    rows, cols = linear_sum_assignment(1.0 - cosines)
    return float(np.mean(cosines[rows, cols]))


def uniqueness(decoder: torch.Tensor, truth: torch.Tensor) -> float:
    """Distinct best-matched true features / latents (module doc); 0 for an empty dictionary."""
    if decoder.shape[0] == 0:
        return 0.0
    return len(torch.unique(_abs_cosines(decoder, truth).argmax(dim=1))) / decoder.shape[0]


def best_matches(decoder: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """[n] each latent's best-matching true feature by |cosine|."""
    return _abs_cosines(decoder, truth).argmax(dim=1)


def dictionary_scores(
    decoders: torch.Tensor, feature_mask: torch.Tensor, truth: torch.Tensor
) -> dict[str, torch.Tensor]:
    """{"mcc", "uniqueness"}: [M] of each member's real latents (feature_mask [M, n] > 0) of decoders [M, n, d]."""
    values: dict[str, list[float]] = {"mcc": [], "uniqueness": []}
    for decoder, mask in zip(decoders, feature_mask):
        real = decoder[mask > 0]
        values["mcc"].append(mcc(real, truth))
        values["uniqueness"].append(uniqueness(real, truth))
    return {name: torch.tensor(v) for name, v in values.items()}


class Detection:
    """Each latent as a detector of its best-matching true feature, counted over batches of rows (module doc)."""

    def __init__(self, decoder: torch.Tensor, truth: torch.Tensor) -> None:
        self.matches = best_matches(decoder, truth)
        n = decoder.shape[0]
        self.tp, self.fp, self.fn = (torch.zeros(n, dtype=torch.float64, device=decoder.device) for _ in range(3))

    def add(self, codes: torch.Tensor, true_codes: torch.Tensor) -> None:
        """codes [R, n] of rows whose true codes are [R, F]."""
        fires = codes != 0
        truth_fires = true_codes[:, self.matches] > 0
        self.tp += (fires & truth_fires).sum(0)
        self.fp += (fires & ~truth_fires).sum(0)
        self.fn += (~fires & truth_fires).sum(0)

    def scores(self) -> dict[str, float]:
        """Mean precision, recall and F1 over latents (0 where a latent's is undefined)."""
        precision = torch.where(self.tp + self.fp > 0, self.tp / (self.tp + self.fp).clamp(min=1), 0.0)
        recall = torch.where(self.tp + self.fn > 0, self.tp / (self.tp + self.fn).clamp(min=1), 0.0)
        f1 = torch.where(precision + recall > 0, 2 * precision * recall / (precision + recall).clamp(min=1e-30), 0.0)
        return {"precision": float(precision.mean()), "recall": float(recall.mean()), "f1": float(f1.mean())}


class Absorption:
    """Feature absorption on a hierarchical world, counted over batches of rows (module doc). `parents` [F]: each
    true feature's parent, -1 for roots."""

    def __init__(self, decoder: torch.Tensor, truth: torch.Tensor, parents: torch.Tensor) -> None:
        self.latent_of = _abs_cosines(decoder, truth).argmax(dim=0)  # [F] each true feature's closest latent
        parents = parents.to(self.latent_of.device).long()
        children = torch.nonzero(parents >= 0).flatten()
        self.parent_ids, slot = torch.unique(parents[children], return_inverse=True)  # [P], each child's parent slot
        self.children, self.slot = children, slot
        self.fired = torch.zeros(len(self.parent_ids), dtype=torch.float64, device=decoder.device)
        self.absorbed = torch.zeros_like(self.fired)

    def add(self, codes: torch.Tensor, true_codes: torch.Tensor) -> None:
        """codes [R, n] of rows whose true codes are [R, F]."""
        if not len(self.parent_ids):
            return
        fires, truth_fires = codes != 0, true_codes > 0
        parent_on = truth_fires[:, self.parent_ids]  # [R, P]
        silent = ~fires[:, self.latent_of[self.parent_ids]]
        child_took_over = (truth_fires[:, self.children] & fires[:, self.latent_of[self.children]]).float()  # [R, C]
        took_over = torch.zeros_like(parent_on, dtype=torch.float32).index_add_(1, self.slot, child_took_over) > 0
        self.fired += parent_on.sum(0)
        self.absorbed += (parent_on & silent & took_over).sum(0)

    def score(self) -> float:
        """The mean absorption rate over parents that fired (0 without any)."""
        fired = self.fired > 0
        return float((self.absorbed[fired] / self.fired[fired]).mean()) if fired.any() else 0.0


class DetectionScan:
    """precision, recall, F1 (and absorption on a hierarchical world) of every member of an ensemble, fed the
    ensemble's codes part by part (metrics.heldout_metrics' `observe`) of rows whose true codes are `true_codes`
    [R, F] (sparse or dense). decoders [M, n, d] and feature_mask [M, n] as Ensemble holds them; parents [F]."""

    def __init__(
        self,
        true_codes: torch.Tensor,
        decoders: torch.Tensor,
        feature_mask: torch.Tensor,
        truth: torch.Tensor,
        parents: torch.Tensor | None = None,
    ) -> None:
        self.true_codes = true_codes
        self.real = [mask > 0 for mask in feature_mask]
        self.detections = [Detection(decoder[keep], truth) for decoder, keep in zip(decoders, self.real)]
        hierarchical = parents is not None and bool((parents >= 0).any())
        self.absorptions = (
            [Absorption(decoder[keep], truth, parents) for decoder, keep in zip(decoders, self.real)]
            if hierarchical
            else []
        )

    def observe(self, codes: torch.Tensor, start: int) -> None:
        """codes [M, b, n] of rows start .. start + b."""
        end = start + codes.shape[1]
        if self.true_codes.is_sparse:
            part = self.true_codes.index_select(0, torch.arange(start, end)).to_dense().to(codes.device)
        else:
            part = self.true_codes[start:end].to(codes.device)
        for m, keep in enumerate(self.real):
            self.detections[m].add(codes[m][:, keep], part)
            if self.absorptions:
                self.absorptions[m].add(codes[m][:, keep], part)

    def scores(self) -> dict[str, torch.Tensor]:
        """{"precision", "recall", "f1"[, "absorption"]}: [M]."""
        scores = [d.scores() for d in self.detections]
        result = {name: torch.tensor([s[name] for s in scores]) for name in ("precision", "recall", "f1")}
        if self.absorptions:
            result["absorption"] = torch.tensor([a.score() for a in self.absorptions])
        return result
