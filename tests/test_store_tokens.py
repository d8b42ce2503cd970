"""LM stores keep every row's token (token id, context, position) beside its chunk, so contexts can be rebuilt as
text; the files are checked like chunks, resumed with them, and stores without tokens say so in one line."""

import json

import numpy as np
import pytest
import torch

from sae_ensemble.activations.format import MANIFEST, StoreError
from sae_ensemble.activations.harvest import get_or_harvest, iter_contexts, iter_texts
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.writer import ChunkWriter
from tests.test_harvest import CONTEXT, harvest_kwargs

HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def test_each_row_keeps_the_token_it_came_from_and_its_context_reads_back_as_text(
    tmp_path, model_dir, text_file, bridge
):
    stores = get_or_harvest(model_dir, HOOKS, text_file, **harvest_kwargs(tmp_path))
    contexts = list(iter_contexts(iter_texts(text_file), bridge.tokenizer, CONTEXT))
    store = stores[HOOKS[0]]
    assert store.has_tokens and store.manifest["tokens"]["tokenizer"] == {"name": model_dir, "revision": None}
    every = store.tokens().rows(np.arange(store.n_rows))
    token, context, position = every.T
    assert (position >= 1).all()  # the BOS position was dropped, as the rows were
    assert np.array_equal(token, [contexts[c][p] for c, p in zip(context, position)])
    np.testing.assert_array_equal(stores[HOOKS[1]].tokens().rows(np.arange(store.n_rows)), every)  # siblings agree

    # A held-out row's context rebuilt from the store alone: the rows of its context, in position order.
    row = int(store.heldout_indices()[0])
    c = every[row, 1]
    same = every[every[:, 1] == c]
    assert np.array_equal(same[:, 2], np.arange(1, 1 + len(same)))
    text = bridge.tokenizer.decode(same[:, 0].tolist())
    assert text == bridge.tokenizer.decode(contexts[c][1 : 1 + len(same)]) and text.strip()

    # Rows in any order, across chunks: the same as the whole table's rows.
    picked = np.array([store.n_rows - 1, 0, 301, 299, 300])
    np.testing.assert_array_equal(store.tokens().rows(picked), every[picked])


def test_an_interrupted_harvest_resumes_its_tokens_with_its_chunks(tmp_path, model_dir, text_file, monkeypatch):
    reference = get_or_harvest(model_dir, HOOKS[0], text_file, **harvest_kwargs(tmp_path / "ref"))[HOOKS[0]]
    calls = {"n": 0}
    write = ChunkWriter._write_chunk

    def dies_on_the_fourth_chunk(self, path, rows):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return write(self, path, rows)

    monkeypatch.setattr(ChunkWriter, "_write_chunk", dies_on_the_fourth_chunk)
    with pytest.raises(KeyboardInterrupt):
        get_or_harvest(model_dir, HOOKS[0], text_file, **harvest_kwargs(tmp_path))
    monkeypatch.setattr(ChunkWriter, "_write_chunk", write)
    resumed = get_or_harvest(model_dir, HOOKS[0], text_file, **harvest_kwargs(tmp_path))[HOOKS[0]]
    rows = np.arange(reference.n_rows)
    np.testing.assert_array_equal(resumed.tokens().rows(rows), reference.tokens().rows(rows))
    assert len(list(resumed.path.glob("tokens_*"))) == len(resumed.manifest["chunks"])  # no stale tokens file


def test_a_store_without_tokens_says_so_in_one_line(tmp_path):
    writer = ChunkWriter(tmp_path / "old", 4, rows_per_chunk=8, source={"kind": "lm", "model": "gpt2"})
    writer.write(torch.randn(20, 4))
    store = writer.close()
    assert not store.has_tokens
    with pytest.raises(StoreError, match="has no tokens .it was harvested before stores kept their tokens."):
        store.tokens()
    with pytest.raises(StoreError, match="takes tokens .n, 3. with each write exactly when it has a tokenizer"):
        ChunkWriter(tmp_path / "new", 4, tokenizer={"name": "gpt2", "revision": None}).write(torch.randn(2, 4))


def test_a_missing_or_corrupt_tokens_file_is_found(tmp_path):
    writer = ChunkWriter(tmp_path / "s", 4, rows_per_chunk=8, tokenizer={"name": "m", "revision": None})
    writer.write(torch.randn(20, 4), torch.arange(60, dtype=torch.int32).reshape(20, 3))
    path = writer.close().path
    assert ActivationStore.open(path).tokens().rows(np.array([19]))[0].tolist() == [57, 58, 59]

    tokens = path / "tokens_00001.safetensors"
    data = bytearray(tokens.read_bytes())
    data[-1] ^= 1
    tokens.write_bytes(bytes(data))  # same size: only the checksum sees it
    with pytest.raises(StoreError, match="tokens_00001.safetensors does not match the sha256"):
        ActivationStore.open(path, verify="checksum")
    tokens.write_bytes(bytes(data[:-4]))
    with pytest.raises(StoreError, match="tokens_00001.safetensors is missing or has the wrong size"):
        ActivationStore.open(path).tokens()
    manifest = json.loads((path / MANIFEST).read_text())
    assert manifest["tokens"]["columns"] == ["token", "context", "position"]
