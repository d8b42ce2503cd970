"""Feature statistics (features.py, run by the evaluation stage): every number recomputed here from the reference
encode over all the held-out rows at once, and every context checked against the store's tokens."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from sae_ensemble import architectures, pipeline
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.checkpoint import load_member
from sae_ensemble.features import FEATURES_JSON, FEATURES_TENSORS, FeatureSettings, write_group_features
from tests.sweeps import compose_config
from tests.test_hooks import TINY_LM

SYNTHETIC = ["data.d_in=32", "data.n_features=48", "data.n_rows=20000", "data.rows_per_chunk=5000"]


def run(run_dir, stores, *overrides):
    cfg = compose_config(*overrides, f"data.store_root={stores}", "progress=false", "wandb=disabled")
    assert pipeline.run(cfg, run_dir) == 0
    [store] = [ActivationStore.open(p.parent) for p in stores.glob("*/manifest.json")]
    return store


def reference_codes(member_dir, store, rows):
    member, params, _, _ = load_member(member_dir)
    architecture = architectures.module_of(member.variant)
    x = store.rows(rows)[:, : member.d_in]
    codes = architecture.encode(params, architectures.make_hparams(member), x, architecture.layout([member]))
    return member, codes[:, : member.dict_size]


@pytest.fixture(scope="module")
def lm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    store = run(root / "run", root / "stores", *TINY_LM, "eval.ce_loss=false", "eval.feature_rows=1500")
    return root / "run", store


def test_each_latents_statistics_and_top_contexts_are_the_reference_encodes(lm_run):
    run_dir, store = lm_run
    rows = np.sort(store.heldout_indices()[:1500])
    for member_dir in sorted((run_dir / "members").iterdir()):
        member, codes = reference_codes(member_dir, store, rows)
        tensors = load_file(member_dir / FEATURES_TENSORS)
        features = json.loads((member_dir / FEATURES_JSON).read_text())
        rate = (codes > 0).float().mean(0)
        torch.testing.assert_close(tensors["firing_rate"], rate)
        assert features["rows"] == 1500 and features["dead"] == int((rate == 0).sum())
        assert sum(features["histogram"]["counts"]) == member.dict_size - features["dead"]
        assert len(features["latents"]) >= 10 and features["has_contexts"]
        for latent in features["latents"]:
            j = latent["index"]
            fired = codes[:, j][codes[:, j] > 0]
            assert latent["mean_activation"] == pytest.approx(float(fired.mean()), rel=1e-5)
            # the reported top context is where the latent fires most on the held-out rows (the corpus repeats
            # lines, so several rows can tie: compare activations, not row numbers)
            top = latent["contexts"][0]
            at_top = codes[np.searchsorted(rows, top["row"]), j]
            assert float(at_top) == pytest.approx(float(codes[:, j].max()), abs=1e-6)
            assert top["activations"][top["max_at"]] == pytest.approx(float(codes[:, j].max()), abs=1e-5)
            values = [c["activations"][c["max_at"]] for c in latent["contexts"]]
            assert values == sorted(values, reverse=True) and len(values) == min(10, len(fired))
            assert len(latent["contexts"]) >= 5, latent  # issue #35: ten latents, five contexts each
            for context in latent["contexts"]:
                window = np.flatnonzero(
                    store.tokens().rows(np.arange(store.n_rows))[:, 1] == context["context"]
                )  # the context's rows
                shown = [r for r in window if abs(int(r) - context["row"]) <= 8]
                table = store.tokens().rows(np.array(shown))
                assert context["token_ids"] == table[:, 0].tolist() and context["positions"] == table[:, 2].tolist()
                assert shown[context["max_at"]] == context["row"]
                _, window_codes = reference_codes(member_dir, store, np.array(shown))
                np.testing.assert_allclose(context["activations"], window_codes[:, j].numpy(), atol=1e-5)
        break  # one member is enough here; the test below covers the choice on every member


def test_the_chosen_latents_are_the_most_frequent_the_rarest_alive_and_a_sample(lm_run):
    run_dir, _ = lm_run
    for member_dir in (run_dir / "members").iterdir():
        rate = load_file(member_dir / FEATURES_TENSORS)["firing_rate"]
        latents = json.loads((member_dir / FEATURES_JSON).read_text())["latents"]
        alive = torch.nonzero(rate > 0).flatten()
        frequent = [x["index"] for x in latents if x["why"] == "frequent"]
        rare = [x["index"] for x in latents if x["why"] == "rare"]
        assert sorted(rate[frequent].tolist()) == sorted(rate[alive].sort(descending=True).values[:5].tolist())
        assert sorted(rate[rare].tolist()) == sorted(rate[alive].sort().values[:5].tolist())
        assert len({x["index"] for x in latents}) == len(latents) == min(20, len(alive))


def test_synthetic_latents_show_their_best_true_feature_and_a_store_without_tokens_its_statistics(tmp_path):
    store = run(tmp_path / "run", tmp_path / "stores", "grid=quick", *SYNTHETIC, "training.steps=200")
    truth = store.ground_truth()
    for member_dir in (tmp_path / "run" / "members").iterdir():
        features = json.loads((member_dir / FEATURES_JSON).read_text())
        assert not features["has_contexts"] and features["latents"]
        _, params, _, _ = load_member(member_dir)
        decoder = torch.nn.functional.normalize(params["W_dec"], dim=-1)
        for latent in features["latents"]:
            assert "contexts" not in latent
            cosines = decoder[latent["index"]] @ truth.T
            assert latent["truth"] == {"feature": int(cosines.argmax()), "cosine": pytest.approx(float(cosines.max()))}


def test_features_are_off_with_eval_features_false_and_settings_bound_what_is_kept(tmp_path):
    run(tmp_path / "run", tmp_path / "stores", "grid=quick", *SYNTHETIC, "training.steps=20", "eval.features=false")
    member_dir = next((tmp_path / "run" / "members").iterdir())
    assert not (member_dir / FEATURES_JSON).exists()
    store = ActivationStore.open(next((tmp_path / "stores").glob("*/manifest.json")).parent)
    settings = FeatureSettings(contexts=3, frequent=1, rare=1, sample=2, rows=100)
    write_group_features([member_dir], store, "none", torch.device("cpu"), settings)
    assert load_file(member_dir / FEATURES_TENSORS)["top_rows"].shape[1] == 3
    features = json.loads((member_dir / FEATURES_JSON).read_text())
    assert features["rows"] == 100
    assert [x["why"] for x in features["latents"]] == ["frequent", "rare", "sample", "sample"]


def test_each_chosen_latent_shows_its_closest_latents_in_the_next_dictionary_size_with_their_contexts(lm_run):
    """Feature splitting: the partner (next size, all else equal)'s three closest decoder rows, their firing rates
    and top contexts, all recomputed here; the largest dictionary has no partner."""
    run_dir, store = lm_run
    rows = np.sort(store.heldout_indices()[:1500])
    small, large = run_dir / "members" / "relu-d64-l1_0.001-bd0-lr0.001-s0", "relu-d128-l1_0.001-bd0-lr0.001-s0"
    _, partner_codes = reference_codes(run_dir / "members" / large, store, rows)
    dictionaries = [
        torch.nn.functional.normalize(load_member(d)[1]["W_dec"], dim=-1) for d in (small, run_dir / "members" / large)
    ]
    for latent in json.loads((small / FEATURES_JSON).read_text())["latents"]:
        splits = latent["splits"]
        cosines = dictionaries[0][latent["index"]] @ dictionaries[1].T
        assert splits["member_id"] == large
        assert [m["index"] for m in splits["matches"]] == cosines.topk(3).indices.tolist()
        for match in splits["matches"]:
            codes = partner_codes[:, match["index"]]
            assert match["cosine"] == pytest.approx(float(cosines[match["index"]]), abs=1e-5)
            assert match["frequency"] == pytest.approx(float((codes > 0).float().mean()))
            if match["frequency"]:
                top = match["contexts"][0]
                assert float(codes[np.searchsorted(rows, top["row"])]) == pytest.approx(float(codes.max()), abs=1e-6)
                assert len(match["contexts"]) == min(3, int((codes > 0).sum()))
    largest = json.loads((run_dir / "members" / large / FEATURES_JSON).read_text())["latents"]
    assert all("splits" not in latent for latent in largest)


def test_an_lm_store_harvested_before_tokens_were_kept_gives_statistics_and_says_why(lm_run, tmp_path):
    import shutil

    from sae_ensemble.activations.format import MANIFEST, StoreError
    from sae_ensemble.features import load_tokenizer
    from sae_ensemble.html_report import write_html_report
    from sae_ensemble.report import by_hook, load_rows, pareto_front

    run_dir, store = lm_run
    old = tmp_path / "store"
    shutil.copytree(store.path, old)
    manifest = json.loads((old / MANIFEST).read_text())
    del manifest["tokens"]
    for chunk in manifest["chunks"]:
        (old / chunk.pop("tokens")["file"]).unlink()
    (old / MANIFEST).write_text(json.dumps(manifest))
    old_store = ActivationStore.open(old)
    with pytest.raises(StoreError, match="harvested before stores kept their tokens"):
        old_store.tokens()

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    member_dir = next((run / "members").iterdir())
    tokenizer = load_tokenizer(old_store)
    write_group_features([member_dir], old_store, "none", torch.device("cpu"), FeatureSettings(rows=500), tokenizer)
    features = json.loads((member_dir / FEATURES_JSON).read_text())
    assert not features["has_contexts"] and "harvested before stores kept their tokens" in features["no_contexts"]
    assert features["latents"] and all("contexts" not in latent for latent in features["latents"])
    index = write_html_report(run, by_hook(load_rows(run)), pareto_front)
    page_data = (index.parent / "members" / f"{member_dir.name}.features.js").read_text()
    assert "harvested before stores kept their tokens" in page_data


def test_one_pass_every_held_out_block_is_read_once_and_encoded_once_by_each_member(tmp_path, monkeypatch):
    """#35's "one pass": for an ensemble's members together, each held-out block is read from the store once and each
    member encodes each held-out row once (a store without tokens: no context windows beside)."""
    from sae_ensemble import features

    run(tmp_path / "run", tmp_path / "stores", "grid=quick", *SYNTHETIC, "training.steps=20", "eval.features=false")
    store = ActivationStore.open(next((tmp_path / "stores").glob("*/manifest.json")).parent)
    dirs = sorted((tmp_path / "run" / "members").iterdir())
    encoded, reads = {}, []
    call, rows = features._Encoder.__call__, ActivationStore.rows

    def counting_call(self, x):
        encoded[self.member.member_id] = encoded.get(self.member.member_id, 0) + len(x)
        return call(self, x)

    monkeypatch.setattr(features._Encoder, "__call__", counting_call)
    monkeypatch.setattr(ActivationStore, "rows", lambda self, r, *a: reads.append(len(r)) or rows(self, r, *a))
    settings = FeatureSettings(rows=3000)
    write_group_features(dirs, store, "none", torch.device("cpu"), settings)
    assert encoded == {d.name: 3000 for d in dirs}
    assert reads == [3000]  # one block (BLOCK_ROWS is 4096): read once for all four members
