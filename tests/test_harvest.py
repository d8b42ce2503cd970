"""Harvesting a tiny local GPT-2: exact activations, content addressing, resume, bad input."""

import json

import numpy as np
import pytest
import torch

from sae_ensemble.activations import harvest
from sae_ensemble.activations.format import StoreError
from sae_ensemble.activations.harvest import HarvestSpec, get_or_harvest, iter_contexts, iter_texts
from sae_ensemble.activations.writer import ChunkWriter

HOOKS = ["blocks.0.hook_resid_pre", "blocks.1.hook_mlp_out", "blocks.0.mlp.hook_post"]
CONTEXT = 32


def harvest_kwargs(tmp_path, **extra):
    return {
        **dict(
            cache_root=tmp_path / "cache",
            n_tokens=2000,
            context_length=CONTEXT,
            batch_size=8,
            rows_per_chunk=300,
            progress=False,
        ),
        **extra,
    }


def stored_rows(store):
    return store.rows(np.arange(store.n_rows))


def test_harvested_rows_equal_run_with_cache(tmp_path, model_dir, text_file, bridge):
    stores = get_or_harvest(model_dir, HOOKS, text_file, **harvest_kwargs(tmp_path))
    contexts = list(iter_contexts(iter_texts(text_file), bridge.tokenizer, CONTEXT))
    tokens = torch.tensor(contexts[: -(-2000 // (CONTEXT - 1))])  # enough contexts for 2000 rows
    assert (tokens[:, 0] == bridge.tokenizer.bos_token_id).all()
    _, cache = bridge.run_with_cache(tokens)
    for hook, store in stores.items():
        expected = cache[hook][:, 1:].reshape(-1, cache[hook].shape[-1])[:2000]  # BOS position dropped
        assert store.n_rows == 2000 and store.d_in == expected.shape[1]
        assert torch.equal(stored_rows(store), expected), hook
        assert store.manifest["hook"] == hook and store.manifest["source"]["model"] == model_dir
    assert stores["blocks.0.mlp.hook_post"].d_in == 4 * 64


def test_a_jsonl_corpus_with_bos_kept_stores_every_position_the_model_computes(tmp_path, model_dir, text_file, bridge):
    jsonl = tmp_path / "corpus.jsonl"
    jsonl.write_text(
        "\n".join(json.dumps({"text": line, "id": i}) for i, line in enumerate(open(text_file).read().splitlines()))
    )
    store = get_or_harvest(
        model_dir, "blocks.1.hook_resid_post", str(jsonl), **harvest_kwargs(tmp_path, drop_bos=False)
    )["blocks.1.hook_resid_post"]
    tokens = torch.tensor(list(iter_contexts(iter_texts(text_file), bridge.tokenizer, CONTEXT))[:63])
    _, cache = bridge.run_with_cache(tokens)
    assert torch.equal(stored_rows(store), cache["blocks.1.hook_resid_post"].reshape(-1, 64)[:2000])


def test_second_call_reuses_store_without_booting_model(tmp_path, model_dir, text_file, monkeypatch):
    first = get_or_harvest(model_dir, HOOKS[:2], text_file, **harvest_kwargs(tmp_path))
    monkeypatch.setattr(harvest, "boot_model", lambda *a, **k: pytest.fail("booted the model for a cached store"))
    again = get_or_harvest(model_dir, HOOKS[:2], text_file, **harvest_kwargs(tmp_path))
    assert {h: s.fingerprint for h, s in again.items()} == {h: s.fingerprint for h, s in first.items()}
    assert {s.path for s in again.values()} == {s.path for s in first.values()}


def test_interrupted_harvest_resumes_without_duplicating_or_dropping_rows(tmp_path, model_dir, text_file, monkeypatch):
    reference = get_or_harvest(model_dir, HOOKS[:2], text_file, **harvest_kwargs(tmp_path / "ref"))

    real_write, written = ChunkWriter._write_chunk, []

    def fail_on_fourth(self, path, data):
        written.append(path)
        if len(written) == 4:
            raise RuntimeError("simulated crash")
        return real_write(self, path, data)

    monkeypatch.setattr(ChunkWriter, "_write_chunk", fail_on_fourth)
    with pytest.raises(RuntimeError, match="simulated crash"):
        get_or_harvest(model_dir, HOOKS[:2], text_file, **harvest_kwargs(tmp_path))
    monkeypatch.setattr(ChunkWriter, "_write_chunk", real_write)
    with pytest.raises(StoreError, match="incomplete"):
        harvest.ActivationStore.open(
            harvest.store_dir(HarvestSpec(model_dir, HOOKS[0], text_file, 2000, CONTEXT), tmp_path / "cache")
        )

    real_run, forwards = harvest._run, []
    monkeypatch.setattr(harvest, "_run", lambda *a: forwards.append(a[1].shape) or real_run(*a))
    resumed = get_or_harvest(model_dir, HOOKS[:2], text_file, **harvest_kwargs(tmp_path))
    n_contexts = sum(shape[0] for shape in forwards[1:])  # forwards[0] is the d_in probe
    assert 0 < n_contexts < -(-2000 // (CONTEXT - 1)), "resume should skip the contexts already stored"
    for hook in HOOKS[:2]:
        assert resumed[hook].fingerprint == reference[hook].fingerprint
        assert torch.equal(stored_rows(resumed[hook]), stored_rows(reference[hook]))


def test_the_cache_key_separates_every_spec_that_changes_the_rows():
    base = HarvestSpec("gpt2", "blocks.0.hook_resid_pre", "data.txt", 1000)
    assert base.key() == HarvestSpec("gpt2", "blocks.0.hook_resid_pre", "data.txt", 1000).key()
    for other in [
        HarvestSpec("gpt2", "blocks.1.hook_resid_pre", "data.txt", 1000),
        HarvestSpec("gpt2", "blocks.0.hook_resid_pre", "data.txt", 2000),
        HarvestSpec("gpt2", "blocks.0.hook_resid_pre", "data.txt", 1000, dtype="bfloat16"),
        HarvestSpec("gpt2", "blocks.0.hook_resid_pre", "data.txt", 1000, drop_bos=False),
    ]:
        assert other.key() != base.key()


def test_unknown_hook_names_closest_valid_hooks(tmp_path, model_dir, text_file):
    with pytest.raises(StoreError, match=r"'blocks\.0\.hook_resid_pr' is not a hook.*'blocks\.0\.hook_resid_pre'"):
        get_or_harvest(model_dir, "blocks.0.hook_resid_pr", text_file, **harvest_kwargs(tmp_path))


def test_empty_dataset_is_a_clear_error(tmp_path, model_dir):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(StoreError, match=r"empty\.txt' is empty"):
        get_or_harvest(model_dir, HOOKS[0], str(empty), **harvest_kwargs(tmp_path))


def test_a_too_small_dataset_or_a_record_without_text_is_a_clear_error(tmp_path, model_dir, text_file):
    with pytest.raises(StoreError, match=r"corpus\.txt' ran out after \d+ contexts"):
        get_or_harvest(model_dir, HOOKS[0], text_file, **harvest_kwargs(tmp_path, n_tokens=10**6))
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"body": "hello"}) + "\n")
    with pytest.raises(StoreError, match=r"bad\.jsonl line 1 has no 'text' field"):
        get_or_harvest(model_dir, HOOKS[0], str(bad), **harvest_kwargs(tmp_path))


def test_the_harvest_lets_go_of_its_model_before_training_starts(tmp_path, model_dir, text_file, monkeypatch):
    """Nothing references the model once get_or_harvest returns, with the garbage collector off: so the harvest
    itself collected the model's reference cycles (on a GPU, then emptied the cache), and training gets its memory."""
    import gc
    import weakref

    booted = []
    real_boot = harvest.boot_model

    def boot(*args, **kwargs):
        model = real_boot(*args, **kwargs)
        booted.append(weakref.ref(model))
        return model

    monkeypatch.setattr(harvest, "boot_model", boot)
    gc.collect()
    gc.disable()  # only the harvest's own collection may free the model
    try:
        stores = get_or_harvest(model_dir, HOOKS[:1], text_file, **harvest_kwargs(tmp_path))
        assert len(booted) == 1 and booted[0]() is None
    finally:
        gc.enable()
    assert stores[HOOKS[0]].n_rows == 2000
