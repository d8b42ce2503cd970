"""Feature statistics benchmark: what the evaluation's feature step (sae_ensemble/features.py) costs beside one
forward pass of the members over the same held-out rows.

    .venv/bin/python -m benchmarks.features                 # on the GPU when there is one, else the CPU

For two grids, the default (synthetic, d=256: relu at dict 512 and 1024, two l1) and the tiny LM's grid=quick
(a random tiny GPT-2's blocks.0.hook_resid_post, d=64: relu and topk at dict 64 and 128), members saved as a
sweep saves them:
forward_s   every member encodes the held-out rows once (the blocks the feature pass reads), nothing kept
features_s  write_group_features over the same rows and members: the one pass, the per-latent running top-k,
            the chosen latents' contexts (LM: windows encoded again, tokens decoded) and the files
splits_s    write_splits for the members with a next size (reads the partner's scan; no pass over the rows)
ratio       features_s / forward_s: the step's cost in forward passes. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_ensemble import sae
from sae_ensemble.activations.harvest import get_or_harvest
from sae_ensemble.activations.synthetic import write_synthetic
from sae_ensemble.activations.tiny_model import SAMPLE_TEXT, build_tiny_gpt2
from sae_ensemble.checkpoint import save_member
from sae_ensemble.features import FeatureSettings, load_tokenizer, member_encoder, write_group_features, write_splits
from sae_ensemble.member import Member
from sae_ensemble.metrics import partners_of

ROWS = 16_384  # eval.feature_rows' default


def saved_members(root: Path, members: list[Member]) -> list[Path]:
    """Members at their initialisation (the cost does not depend on training), saved as a sweep saves them."""
    directories = []
    for member in members:
        params = sae.init_params(member.variant, member.d_in, member.dict_size, member.seed)
        params["b_enc"] -= 0.05  # sparse codes, as trained SAEs have: an untrained relu fires on half the latents
        save_member(root / member.member_id, member, params, None, {"steps": 0, "tokens": 0})
        directories.append(root / member.member_id)
    return directories


def measure(name: str, store, members: list[Member], directories: list[Path], device: torch.device) -> dict:
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    settings, tokenizer = FeatureSettings(rows=ROWS), load_tokenizer(store)
    heldout = np.sort(store.heldout_indices()[:ROWS])
    encoders = [member_encoder(d, store, "none", device) for d in directories]

    def forward() -> None:
        for start in range(0, len(heldout), 4096):
            x = store.rows(heldout[start : start + 4096]).to(device)
            for encoder in encoders:
                encoder(x)
        sync()

    forward()  # warm: page cache, allocator
    start = time.perf_counter()
    forward()
    forward_s = time.perf_counter() - start
    start = time.perf_counter()
    write_group_features(directories, store, "none", device, settings, tokenizer)
    sync()
    features_s = time.perf_counter() - start
    where = dict(zip((m.member_id for m in members), directories))
    pairs = [(where[small], where[partners[0].member_id]) for small, partners in partners_of(members).items()]
    start = time.perf_counter()
    for small, large in pairs:
        write_splits(small, large, store, "none", device, settings, tokenizer)
    splits_s = time.perf_counter() - start
    print(
        f"{name}: {len(directories)} members, {len(heldout)} held-out rows: one forward {forward_s:.3f} s, "
        f"features {features_s:.3f} s ({features_s / forward_s:.2f} forwards), splits of {len(pairs)} members "
        f"{splits_s:.3f} s"
    )
    return {f"{name}_forward_s": forward_s, f"{name}_features_s": features_s, f"{name}_splits_s": splits_s,
            f"{name}_ratio": features_s / forward_s}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    result = {"device": str(device)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        store = write_synthetic(root / "synthetic", d_in=256, n_features=512, n_rows=ROWS * 2, heldout_rows=ROWS)
        grid = [Member("relu", 256, size, l1=l1) for size in (512, 1024) for l1 in (3e-4, 1e-3)]
        result.update(measure("default", store, grid, saved_members(root / "default", grid), device))

        corpus = root / "corpus.txt"
        corpus.write_text("\n".join(f"{i} {SAMPLE_TEXT}" for i in range(1000)))
        model = build_tiny_gpt2(root / "model")
        hook = "blocks.0.hook_resid_post"
        lm = get_or_harvest(
            str(model), hook, str(corpus), cache_root=root / "stores", n_tokens=3 * ROWS, context_length=32,
            heldout_rows=ROWS, progress=False, device=str(device),
        )[hook]  # fmt: skip
        quick = [
            Member(v, 64, size, l1=1e-3, k=8 if v == "topk" else 0) for v in ("relu", "topk") for size in (64, 128)
        ]
        result.update(measure("tiny_lm", lm, quick, saved_members(root / "quick", quick), device))
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
