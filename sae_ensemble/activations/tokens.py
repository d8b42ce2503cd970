"""The tokens an LM store's rows came from: each row's token id, context and position, so that a latent's
top-activating rows can be shown as text without running the model again.

Each chunk of such a store has a sibling `tokens_NNNNN.safetensors` (format.py): one tensor `tokens` int32
[rows, 3], the columns TOKEN_COLUMNS = (token id, context index, position in the context). A context is one
`context_length`-token sequence of the harvest (context index counts from the dataset's start, so held-out
rows name their contexts too); the rows of one context are consecutive in the store, in position order
(position 0, the BOS token, is not a row when the harvest dropped it). The manifest's `tokens` names the
tokenizer ({"name", "revision"} of the model) and the columns. Stores written before tokens were kept, and
synthetic stores, have none: `ActivationStore.tokens()` says so in one line.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sae_ensemble.activations.format import TOKEN_COLUMNS, TOKENS_NAME, StoreError, read_chunk_header


class StoreTokens:
    """The tokens files of a complete store, checked against its manifest and memory-mapped."""

    def __init__(self, path: Path, manifest: dict, chunk_starts: np.ndarray) -> None:
        self.path = path
        self.tokenizer: dict = manifest["tokens"]["tokenizer"]
        self.chunk_starts = chunk_starts
        self._maps: list[np.ndarray] = []
        for c in manifest["chunks"]:
            record = c.get("tokens")
            file = path / record["file"] if record else None
            if file is None or not file.is_file() or file.stat().st_size != record["bytes"]:
                name = file or f"the tokens of {c['file']}"
                raise StoreError(
                    f"Store {path} names tokens for every chunk, but {name} is missing or has the wrong size; "
                    "rebuild the store."
                )
            start, header = read_chunk_header(file)
            info = header.get(TOKENS_NAME, {})
            shape = [c["rows"], len(TOKEN_COLUMNS)]
            if info.get("dtype") != "I32" or info.get("shape") != shape:
                raise StoreError(f"Tokens file {file} holds {info or header}; expected {TOKENS_NAME!r} int32 {shape}.")
            offset = start + info["data_offsets"][0]
            self._maps.append(np.memmap(file, dtype="<i4", mode="r", offset=offset, shape=tuple(shape)))

    def rows(self, global_rows: np.ndarray) -> np.ndarray:
        """int32 [len(global_rows), 3]: (token id, context, position) of each row, in the order given."""
        global_rows = np.asarray(global_rows, dtype=np.int64)
        chunk = np.searchsorted(self.chunk_starts, global_rows, side="right") - 1
        if len(global_rows) and (global_rows.min() < 0 or global_rows.max() >= self.chunk_starts[-1]):
            raise StoreError(f"rows {global_rows.min()}..{global_rows.max()} are outside store {self.path}")
        out = np.empty((len(global_rows), len(TOKEN_COLUMNS)), dtype=np.int32)
        for c in np.unique(chunk):
            where = chunk == c
            out[where] = self._maps[c][global_rows[where] - self.chunk_starts[c]]
        return out


def open_tokens(path: Path, manifest: dict, chunk_starts: np.ndarray) -> StoreTokens:
    """The store's tokens, or a StoreError saying plainly that it has none."""
    if "tokens" not in manifest:
        kind = (manifest.get("source") or {}).get("kind")
        why = "its rows are synthetic" if kind != "lm" else "it was harvested before stores kept their tokens"
        raise StoreError(
            f"Store {path} has no tokens ({why}); contexts cannot be shown for it, only activation statistics "
            "(harvest it again into a new store_root to keep them)."
        )
    return StoreTokens(path, manifest, chunk_starts)
