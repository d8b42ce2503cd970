"""What each member learned, from the store alone: latent statistics and top-activating contexts on held-out rows.

The evaluation stage (eval_worker.py) calls `write_group_features` for an ensemble's members (one store): one pass
over the first `FeatureSettings.rows` held-out rows encodes each block for every member of the ensemble, and keeps
per latent its firing count, activation sum and its `contexts` largest activations with their rows. Then, per
member, it chooses latents to show (the most frequent, the rarest alive, and a seeded sample of the alive) and
rebuilds each one's top contexts: the rows of the same context within `window` tokens of the top row (the store's
tokens, activations/tokens.py), encoded again so every token of the window shows the latent's activation. No
language model runs. Synthetic stores have no tokens: each chosen latent shows its best-matching true feature
and their cosine instead.

Feature splitting (`write_splits`, the evaluation's second job, once every member's statistics exist): a member
with a partner (the next larger dictionary with every other hyperparameter equal, metrics.partners_of) shows, for
each chosen latent, the partner's SPLIT_MATCHES latents whose decoder rows are closest to it (cosine), each with
its firing rate and its top SPLIT_CONTEXTS contexts, from the partner's own scan (its top rows of every latent):
no further pass over the held-out rows.

Written in the member's directory, so the report is rebuilt without recomputing (docs/report.md has the schema):
    features.safetensors   firing_rate, mean_activation (over the rows it fires on) [dict_size]; top_values,
                           top_rows [dict_size, contexts] (-1: fewer firing rows than contexts)
    features.json          rows scanned, dead and dense counts, the log10 firing-rate histogram, the chosen latents
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from sae_ensemble import architectures
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.atomic import atomic_write, write_json_atomic
from sae_ensemble.checkpoint import load_member
from sae_ensemble.member import Member
from sae_ensemble.rundir import MemberDir

FEATURES_JSON, FEATURES_TENSORS = MemberDir.FEATURES, MemberDir.FEATURE_STATS
DENSE_RATE = 0.1
"""A latent firing on more than this share of rows is dense (SAEBench's and SAEDashboard's cut-off)."""
HISTOGRAM_EDGES = [float(e) for e in np.linspace(-7, 0, 29)]  # log10 firing rate, 0.25 decades a bin
BLOCK_ROWS = 4096
SPLIT_MATCHES, SPLIT_CONTEXTS = 3, 3  # a chosen latent's closest latents in the next size, and their contexts


@dataclass(frozen=True)
class FeatureSettings:
    """How much the feature statistics show (config: eval.features_*)."""

    contexts: int = 10
    """Top-activating contexts kept per latent."""
    window: int = 8
    """Tokens shown on each side of a context's top token."""
    frequent: int = 5
    """Most frequent latents shown per member."""
    rare: int = 5
    """Rarest alive latents shown per member."""
    sample: int = 10
    """Further alive latents shown, a seeded sample."""
    rows: int = 16_384
    """Held-out rows scanned (at most the store's)."""
    seed: int = 0


@dataclass
class _Encoder:
    """One saved member's codes of store rows (in its own space: normalised input; a transcoder's input part)."""

    member: Member
    params: dict[str, torch.Tensor]
    shift: torch.Tensor
    scale: float

    def __post_init__(self) -> None:
        self.architecture = architectures.module_of(self.member.variant)
        self.hp = {k: v.to(self.shift.device) for k, v in architectures.make_hparams(self.member).items()}
        self.layout = self.architecture.layout([self.member])

    @torch.no_grad()
    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        x = (rows[:, : self.member.d_in] - self.shift) / self.scale
        return self.architecture.encode(self.params, self.hp, x, self.layout)[:, : self.member.dict_size]

    def dictionary(self) -> torch.Tensor:
        rows = self.params["W_enc" if self.member.variant == "tied" else "W_dec"][: self.member.dict_size]
        return torch.nn.functional.normalize(rows.float(), dim=-1)


def member_encoder(directory: Path, store: ActivationStore, normalize: str, device: torch.device) -> _Encoder:
    """A saved member's codes of `store`'s rows, in its own space (normalised as it trained)."""
    member, params, _, _ = load_member(directory)
    if member.d_out:
        shift, scale = torch.zeros(member.d_in), 1.0  # transcoders train unnormalised
    else:
        shift, scale = store.normalization(normalize)
    params = {name: value.to(device) for name, value in params.items()}
    return _Encoder(member, params, shift.float().to(device), float(scale))


@dataclass
class _Scan:
    """One member's running statistics over the held-out rows."""

    count: torch.Tensor  # [n] rows fired on
    total: torch.Tensor  # [n] sum of activations
    top_values: torch.Tensor  # [n, contexts]
    top_rows: torch.Tensor  # [n, contexts] global store rows (-1: none yet)

    @classmethod
    def empty(cls, n: int, contexts: int, device: torch.device) -> _Scan:
        return cls(
            torch.zeros(n, device=device),
            torch.zeros(n, device=device, dtype=torch.float64),
            torch.zeros(n, contexts, device=device),
            torch.full((n, contexts), -1, device=device, dtype=torch.int64),
        )

    def add(self, codes: torch.Tensor, rows: torch.Tensor) -> None:
        """codes [b, n] (>= 0) of the store rows `rows` [b]."""
        self.count += torch.sign(codes).sum(0)  # a float sum of signs: several times a bool count's speed
        self.total += codes.sum(0).double()
        # Only latents whose block maximum beats their kept k-th value can change their top k: after the first
        # blocks, few. Their block top k (along the rows), then merged with the kept ones.
        k = self.top_values.shape[1]
        better = torch.nonzero(codes.amax(0) > self.top_values[:, -1]).flatten()
        if len(better):
            values, at = codes[:, better].topk(min(k, len(rows)), dim=0)  # [k', m]
            merged = torch.cat([self.top_values[better], values.T], dim=1)  # [m, k + k']
            candidates = torch.cat([self.top_rows[better], rows[at].T], dim=1)
            merged, order = merged.topk(k, dim=1)  # largest first
            self.top_values[better], self.top_rows[better] = merged, candidates.gather(1, order)


def write_group_features(
    directories: Sequence[Path],
    store: ActivationStore,
    normalize: str,
    device: torch.device,
    settings: FeatureSettings = FeatureSettings(),
    tokenizer=None,
) -> None:
    """Feature statistics of the saved members in `directories` (all of `store`), written beside each (module doc).
    `tokenizer`: decodes the store's tokens (a store with tokens needs one)."""
    encoders = [member_encoder(Path(d), store, normalize, device) for d in directories]
    heldout = np.sort(store.heldout_indices()[: min(settings.rows, store.heldout_rows)])
    scans = [_Scan.empty(e.member.dict_size, settings.contexts, device) for e in encoders]
    for start in range(0, len(heldout), BLOCK_ROWS):  # the one pass: each block encoded once by every member
        block = heldout[start : start + BLOCK_ROWS]
        x = store.rows(block).to(device)
        rows = torch.as_tensor(block, device=device)
        for encoder, scan in zip(encoders, scans):
            scan.add(encoder(x), rows)
    for directory, encoder, scan in zip(directories, encoders, scans):
        _write(Path(directory), encoder, scan, len(heldout), store, settings, tokenizer)


def splits_written(directory: Path) -> bool:
    """Whether `write_splits` has run for this member (or there is nothing to split: no features.json)."""
    path = Path(directory) / FEATURES_JSON
    return not path.exists() or "splits_into" in json.loads(path.read_text())


def write_splits(
    directory: Path,
    partner_dir: Path,
    store: ActivationStore,
    normalize: str,
    device: torch.device,
    settings: FeatureSettings = FeatureSettings(),
    tokenizer=None,
) -> None:
    """Add to a member's features.json, for each chosen latent, its closest latents in its partner's dictionary with
    their firing rates and contexts (module doc); the partner's features.safetensors must exist."""
    directory, partner_dir = Path(directory), Path(partner_dir)
    features = json.loads((directory / FEATURES_JSON).read_text())
    own = member_encoder(directory, store, normalize, device)
    partner = member_encoder(partner_dir, store, normalize, device)
    scan = load_file(partner_dir / FEATURES_TENSORS)
    own_rows, dictionary = own.dictionary(), partner.dictionary()
    for latent in features["latents"]:
        cosines = (own_rows[latent["index"]] @ dictionary.T).cpu()
        values, indices = cosines.topk(min(SPLIT_MATCHES, len(cosines)))
        matches = []
        for index, cosine in zip(indices.tolist(), values.tolist()):
            match = {"index": index, "cosine": cosine, "frequency": float(scan["firing_rate"][index])}
            if store.has_tokens:
                top = [int(r) for r, v in zip(scan["top_rows"][index], scan["top_values"][index]) if v > 0]
                top = top[:SPLIT_CONTEXTS]
                match["contexts"] = contexts(partner, index, top, store, settings, tokenizer)
            matches.append(match)
        latent["splits"] = {"member_id": partner.member.member_id, "matches": matches}
    features["splits_into"] = partner.member.member_id
    write_json_atomic(directory / FEATURES_JSON, features)


def _write(directory, encoder, scan, n_rows, store, settings, tokenizer) -> None:
    rate = (scan.count / n_rows).cpu()
    mean = torch.where(scan.count > 0, scan.total / scan.count.clamp(min=1), 0.0).float().cpu()
    top_values = torch.where(scan.top_values > 0, scan.top_values, 0.0).cpu()
    top_rows = torch.where(scan.top_values > 0, scan.top_rows, -1).cpu()
    tensors = {"firing_rate": rate, "mean_activation": mean, "top_values": top_values, "top_rows": top_rows}
    atomic_write(directory / FEATURES_TENSORS, lambda tmp: save_file(tensors, tmp))

    alive = torch.nonzero(rate > 0).flatten()
    log_rate = torch.log10(rate[alive].double()).clamp(HISTOGRAM_EDGES[0], HISTOGRAM_EDGES[-1]).numpy()
    counts, _ = np.histogram(log_rate, bins=HISTOGRAM_EDGES)
    truth = store.ground_truth()  # synthetic stores: cosines of the chosen latents' decoder rows with it
    if truth is not None:
        truth = (encoder.dictionary().cpu() @ truth.T).max(dim=1)
    latents = [
        _latent(index, why, rate, mean, top_values, top_rows, encoder, store, settings, tokenizer, truth)
        for index, why in choose_latents(rate, settings)
    ]
    write_json_atomic(
        directory / FEATURES_JSON,
        {
            "member_id": encoder.member.member_id,
            "rows": n_rows,
            "dict_size": encoder.member.dict_size,
            "dead": int((rate == 0).sum()),
            "dense": int((rate > DENSE_RATE).sum()),
            "dense_rate": DENSE_RATE,
            "histogram": {"log10_edges": HISTOGRAM_EDGES, "counts": counts.tolist()},
            "has_contexts": store.has_tokens,
            **({} if store.has_tokens else {"no_contexts": no_tokens_reason(store)}),
            "latents": latents,
        },
    )


def choose_latents(rate: torch.Tensor, settings: FeatureSettings) -> list[tuple[int, str]]:
    """(latent, why) to show: the most frequent, the rarest alive, then a seeded sample of the other alive ones."""
    alive = torch.nonzero(rate > 0).flatten()
    by_rate = alive[torch.argsort(rate[alive], descending=True, stable=True)].tolist()
    chosen: dict[int, str] = {}
    for index in by_rate[: settings.frequent]:
        chosen.setdefault(index, "frequent")
    for index in by_rate[::-1][: settings.rare]:
        chosen.setdefault(index, "rare")
    rest = [i for i in by_rate if i not in chosen]
    order = torch.randperm(len(rest), generator=torch.Generator().manual_seed(settings.seed))
    for position in order[: settings.sample].tolist():
        chosen[rest[position]] = "sample"
    return list(chosen.items())


def _latent(index, why, rate, mean, top_values, top_rows, encoder, store, settings, tokenizer, truth) -> dict:
    latent = {
        "index": index,
        "why": why,
        "frequency": float(rate[index]),
        "mean_activation": float(mean[index]),
        "max_activation": float(top_values[index, 0]),
    }
    if store.has_tokens:
        latent["contexts"] = contexts(
            encoder, index, [int(r) for r in top_rows[index] if r >= 0], store, settings, tokenizer
        )
    if truth is not None:
        latent["truth"] = {"feature": int(truth.indices[index]), "cosine": float(truth.values[index])}
    return latent


def contexts(encoder: _Encoder, index: int, rows: list[int], store: ActivationStore, settings, tokenizer) -> list[dict]:
    """The tokens of each row's context within `window` of it, each with latent `index`'s activation there: every
    window's rows read and encoded at once."""
    if not rows:
        return []
    tokens = store.tokens()
    offsets = np.arange(-settings.window, settings.window + 1)
    near = np.clip(np.asarray(rows)[:, None] + offsets, 0, store.n_rows - 1)  # [contexts, 2 window + 1]
    table = tokens.rows(near.ravel()).reshape(*near.shape, 3)
    same = table[:, :, 1] == table[:, settings.window : settings.window + 1, 1]  # the top row's context
    same &= (np.asarray(rows)[:, None] + offsets >= 0) & (np.asarray(rows)[:, None] + offsets < store.n_rows)
    unique, inverse = np.unique(near[same], return_inverse=True)
    codes = encoder(store.rows(unique).to(encoder.shift.device))[:, index].cpu()[torch.as_tensor(inverse)]
    result, start = [], 0
    for row, keep, window in zip(rows, same, table):
        shown = window[keep]
        result.append(
            {
                "row": row,
                "context": int(shown[0, 1]),
                "positions": shown[:, 2].tolist(),
                "token_ids": shown[:, 0].tolist(),
                "tokens": [_decoded(tokenizer, int(t)) for t in shown[:, 0]],
                "activations": [round(float(a), 6) for a in codes[start : start + len(shown)]],
                "max_at": int(keep[: settings.window].sum()),  # the top row: the window's centre
            }
        )
        start += len(shown)
    return result


def _decoded(tokenizer, token: int) -> str:
    """One token's text, remembered per tokenizer (a page shows thousands of tokens of a small vocabulary)."""
    cache = tokenizer.__dict__.setdefault("_sae_ensemble_decoded", {})
    if token not in cache:
        cache[token] = tokenizer.decode([token])
    return cache[token]


def no_tokens_reason(store: ActivationStore) -> str:
    """Why a store has no tokens, as a member page says it: synthetic rows, or a store older than tokens."""
    if (store.manifest.get("source") or {}).get("kind") == "lm":
        return "this store was harvested before stores kept their tokens (harvest again into a new store_root)"
    return "the store's rows are synthetic, with no text; each latent shows its best true feature instead"


def load_tokenizer(store: ActivationStore):
    """The tokenizer that made a store's tokens (its manifest names the model), or None for a store without tokens."""
    if not store.has_tokens:
        return None
    from transformers import AutoTokenizer

    named = store.manifest["tokens"]["tokenizer"]
    return AutoTokenizer.from_pretrained(named["name"], revision=named.get("revision"))
