"""#35's feature splitting on a store built to split: one parent direction whose two children (mutually exclusive,
cosine 0.47) share one latent in a small dictionary and get one each in the next size. The sweep's evaluation
must match the small dictionary's parent latent to both children's latents."""

import json

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from sae_ensemble import pipeline
from sae_ensemble.activations.format import GROUND_TRUTH
from sae_ensemble.activations.writer import ChunkWriter
from sae_ensemble.checkpoint import load_member
from sae_ensemble.features import FEATURES_JSON
from tests.sweeps import compose_config

D = 16


def splitting_store(path, n_rows=60_000, seed=0):
    """Rows = sum of active features: six independent ones along e2..e7 (p 0.15 each) and, with p 0.3, one of two
    children g1, g2 = normalize(e0 +- 0.6 e1) of a parent e0 (one child at a time). Truth: [6 + 2, D]."""
    g = torch.Generator().manual_seed(seed)
    eye = torch.eye(D)
    children = F.normalize(torch.stack([eye[0] + 0.6 * eye[1], eye[0] - 0.6 * eye[1]]), dim=-1)
    features = torch.cat([eye[2:8], children])
    fires = torch.rand(n_rows, 6, generator=g) < 0.15
    parent = torch.rand(n_rows, generator=g) < 0.3
    child = torch.randint(0, 2, (n_rows,), generator=g)
    active = torch.cat([fires, torch.stack([parent & (child == 0), parent & (child == 1)], 1)], 1).float()
    rows = (active * (0.5 + torch.rand(n_rows, 8, generator=g))) @ features
    writer = ChunkWriter(path, D, rows_per_chunk=20_000, source={"kind": "synthetic", "d_in": D}, heldout_rows=4000)
    writer.write(rows)
    writer.close()
    save_file({"features": features.contiguous()}, str(path / GROUND_TRUTH))
    return features


def test_the_parent_latent_of_a_small_dictionary_is_matched_to_both_children_in_the_next_size(tmp_path):
    features = splitting_store(tmp_path / "store")
    cfg = compose_config(
        f"data.store={tmp_path / 'store'}",
        f"data.d_in={D}",
        "grid.variants=[relu]",
        "grid.dict_ratios=[]",
        "grid.dict_sizes=[7,14]",
        "grid.l1=[3e-3]",
        "grid.lr=[1e-2]",
        "training.steps=1500",
        "training.batch_size=256",
        "devices=cpu",
        "progress=false",
        "wandb=disabled",
    )
    assert pipeline.run(cfg, tmp_path / "run") == 0
    small, large = sorted((tmp_path / "run" / "members").iterdir(), key=lambda p: load_member(p)[0].dict_size)
    decoders = {p: F.normalize(load_member(p)[1]["W_dec"], dim=-1) for p in (small, large)}
    report = json.loads((small / FEATURES_JSON).read_text())
    assert report["splits_into"] == large.name
    [parent] = [x for x in report["latents"] if float(decoders[small][x["index"]] @ torch.eye(D)[0]) > 0.95]
    matched = parent["splits"]["matches"][:2]
    # the two closest latents of the larger dictionary are one child each, both close to the parent
    children = [int((decoders[large][m["index"]] @ features[6:].T).argmax()) for m in matched]
    assert sorted(children) == [0, 1], matched
    for m, child in zip(matched, children):
        assert float(decoders[large][m["index"]] @ features[6 + child]) > 0.95
        assert m["cosine"] > 0.75 and m["frequency"] > 0.1
