"""ChunkWriter: rows in, full chunks out, resumable after an interruption; close() opens the store.

The format it writes is in format.py; docs/store.md, "Writing", gives the resume and atomicity rules.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import torch

from sae_ensemble.activations.format import (
    DEFAULT_HELDOUT_CAP,
    DEFAULT_HELDOUT_FRACTION,
    DTYPES,
    FORMAT_VERSION,
    MANIFEST,
    PROGRESS,
    TOKEN_COLUMNS,
    TOKENS_NAME,
    StoreError,
    check_dtype,
    chunk_name,
    library_versions,
    tokens_name,
    write_chunk_file,
)
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.atomic import write_json_atomic


class ChunkWriter:
    """Accept rows in any batch sizes, write full chunks atomically, resume after an interruption.

    `resume_rows` is the number of rows already stored by an earlier, interrupted writer with the
    same parameters; the producer must skip that many rows before calling `write`.
    `close()` flushes the last partial chunk and writes manifest.json last.

    `tokenizer` (LM stores: {"name", "revision"} of the model whose tokenizer made the tokens): every `write`
    then also takes each row's (token id, context, position), kept in a tokens file beside each chunk.
    """

    def __init__(
        self,
        path: str | Path,
        d_in: int,
        dtype: str = "float32",
        rows_per_chunk: int = 65_536,
        *,
        source: dict | None = None,
        hook: str | None = None,
        heldout_rows: int | None = None,
        tokenizer: dict | None = None,
    ) -> None:
        self.path = Path(path)
        self.tokenizer = tokenizer
        self.d_in = int(d_in)
        self.dtype = check_dtype(dtype)
        self.rows_per_chunk = int(rows_per_chunk)
        self.source = dict(source or {})
        self.hook = hook
        self.heldout_rows = heldout_rows
        if self.d_in <= 0 or self.rows_per_chunk <= 0:
            raise StoreError(f"d_in ({d_in}) and rows_per_chunk ({rows_per_chunk}) must be positive.")
        if self.path.exists() and not self.path.is_dir():
            raise StoreError(f"Store path {self.path} is a file; a store must be a directory.")
        if (self.path / MANIFEST).exists():
            raise StoreError(f"Store {self.path} is already complete (it has {MANIFEST}); open it instead.")
        self.path.mkdir(parents=True, exist_ok=True)

        self._params = {
            "d_in": self.d_in,
            "dtype": self.dtype,
            "rows_per_chunk": self.rows_per_chunk,
            "source": self.source,
            "hook": self.hook,
        }
        self.chunks: list[dict] = []
        self._sum = np.zeros(self.d_in, dtype=np.float64)  # running sums for the mean and norms
        self._sum_norm = 0.0
        self._sum_sq_norm = 0.0
        self._load_progress()
        self.resume_rows = sum(c["rows"] for c in self.chunks)
        self.n_rows = self.resume_rows
        np_dtype = DTYPES[self.dtype][1]
        self._buffer = np.empty((self.rows_per_chunk, self.d_in), dtype=np_dtype)  # [rows_per_chunk, d_in]
        self._tokens = np.empty((self.rows_per_chunk, len(TOKEN_COLUMNS)), dtype=np.int32) if tokenizer else None
        self._filled = 0
        self._closed = False

    def _load_progress(self) -> None:
        progress_path = self.path / PROGRESS
        if progress_path.exists():
            try:
                progress = json.loads(progress_path.read_text())
            except json.JSONDecodeError as e:
                raise StoreError(
                    f"Progress file {progress_path} is not valid JSON ({e}); delete the directory to start over."
                ) from None
            if progress.get("params") != json.loads(json.dumps(self._params)):
                raise StoreError(
                    f"Incomplete store {self.path} was started with different parameters "
                    f"({progress.get('params')}); delete it or choose another directory."
                )
            self.chunks = progress["chunks"]
            self._sum = np.asarray(progress["sum"], dtype=np.float64)
            self._sum_norm = float(progress["sum_norm"])
            self._sum_sq_norm = float(progress["sum_sq_norm"])
        # Chunk files beyond the recorded ones (a crash between os.replace and the progress
        # update) and temp files are stale: they are rewritten from the producer's rows.
        recorded = {c["file"] for c in self.chunks} | {c["tokens"]["file"] for c in self.chunks if "tokens" in c}
        for stale in [*self.path.glob("chunk_*.safetensors*"), *self.path.glob("tokens_*.safetensors*")]:
            if stale.name not in recorded:
                stale.unlink()
        for c in [*self.chunks, *(c["tokens"] for c in self.chunks if "tokens" in c)]:
            f = self.path / c["file"]
            if not f.exists() or f.stat().st_size != c["bytes"]:
                raise StoreError(
                    f"Chunk {f} named in {progress_path} is missing or has the wrong size; "
                    f"delete {self.path} to start over."
                )

    def write(self, rows: torch.Tensor | np.ndarray, tokens: torch.Tensor | np.ndarray | None = None) -> None:
        """Append rows [n, d_in] (and, with a tokenizer, their tokens [n, 3]); full chunks are written as they fill."""
        if self._closed:
            raise StoreError(f"ChunkWriter for {self.path} is closed; it accepts no more rows.")
        if (tokens is None) != (self._tokens is None) or (tokens is not None and tuple(tokens.shape) != (len(rows), 3)):
            raise StoreError(
                f"ChunkWriter for {self.path} takes tokens [n, 3] with each write exactly when it has a tokenizer "
                f"({self.tokenizer}); got {None if tokens is None else list(tokens.shape)} for {len(rows)} rows."
            )
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu")
            if rows.dtype != DTYPES[self.dtype][2]:
                rows = rows.to(DTYPES[self.dtype][2])
            rows = rows.contiguous()
            rows = rows.view(torch.uint16).numpy() if self.dtype == "bfloat16" else rows.numpy()
        else:
            if self.dtype == "bfloat16":
                rows = np.asarray(rows, dtype=np.float32)
                rows = torch.from_numpy(rows).to(torch.bfloat16).view(torch.uint16).numpy()
            rows = np.asarray(rows, dtype=DTYPES[self.dtype][1])
        if rows.ndim != 2 or rows.shape[1] != self.d_in:
            raise StoreError(
                f"ChunkWriter for {self.path} expects rows of shape [n, {self.d_in}], got {list(rows.shape)}."
            )
        start = 0
        while start < len(rows):
            take = min(self.rows_per_chunk - self._filled, len(rows) - start)
            self._buffer[self._filled : self._filled + take] = rows[start : start + take]
            if tokens is not None:
                self._tokens[self._filled : self._filled + take] = np.asarray(tokens[start : start + take])
            self._filled += take
            start += take
            if self._filled == self.rows_per_chunk:
                self._flush()

    def _flush(self) -> None:
        if self._filled == 0:
            return
        rows = self._buffer[: self._filled]
        values = rows if self.dtype != "bfloat16" else torch.from_numpy(rows).view(torch.bfloat16).float().numpy()
        values = values.astype(np.float64, copy=False)  # stats from the stored (rounded) values
        sq_norms = np.einsum("ij,ij->i", values, values)
        # A squared norm in float64 is finite exactly when the row is (float32 squares cannot
        # overflow it), so this costs nothing extra. A float16 harvest overflows to inf here.
        bad = np.flatnonzero(~np.isfinite(sq_norms))
        if len(bad):
            raise StoreError(
                f"Row {int(bad[0])} of chunk {chunk_name(len(self.chunks))} "
                f"(row {self.n_rows + int(bad[0])} of store {self.path}) "
                f"holds a non-finite value (nan or inf)"
                f"{f' as do {len(bad) - 1} more rows of that chunk' if len(bad) > 1 else ''}; "
                f"stores hold finite rows only (a float16 store overflows beyond 65504: use dtype=bfloat16 or float32)."
            )
        self._sum += values.sum(axis=0)
        self._sum_norm += float(np.sqrt(sq_norms).sum())
        self._sum_sq_norm += float(sq_norms.sum())
        name = chunk_name(len(self.chunks))
        record = {}
        if self._tokens is not None:  # before the chunk: a recorded chunk's tokens are always on disk
            tokens_file = tokens_name(len(self.chunks))
            n_bytes, sha = write_chunk_file(self.path / tokens_file, self._tokens[: self._filled], "int32", TOKENS_NAME)
            record["tokens"] = {"file": tokens_file, "bytes": n_bytes, "sha256": sha}
        n_bytes, sha = self._write_chunk(self.path / name, rows)
        self.chunks.append({"file": name, "rows": int(self._filled), "bytes": n_bytes, "sha256": sha, **record})
        self.n_rows += self._filled
        self._filled = 0
        write_json_atomic(
            self.path / PROGRESS,
            {
                "params": self._params,
                "chunks": self.chunks,
                "sum": self._sum.tolist(),
                "sum_norm": self._sum_norm,
                "sum_sq_norm": self._sum_sq_norm,
            },
        )

    def _write_chunk(self, path: Path, rows: np.ndarray) -> tuple[int, str]:
        return write_chunk_file(path, rows, self.dtype)  # a method so tests can interrupt it

    def close(self) -> ActivationStore:
        """Flush the last partial chunk, write manifest.json (atomically, last) and open the store."""
        if not self._closed:
            self._flush()
            n = self.n_rows
            if n == 0:
                raise StoreError(f"ChunkWriter for {self.path} received no rows; a store needs at least one.")
            heldout = self.heldout_rows
            if heldout is None:
                heldout = min(int(n * DEFAULT_HELDOUT_FRACTION), DEFAULT_HELDOUT_CAP)
            if not 0 <= heldout < n:
                raise StoreError(f"heldout_rows={heldout} must be in [0, {n}) for a store of {n} rows.")
            mean = self._sum / n
            manifest = {
                "format_version": FORMAT_VERSION,
                "source": self.source,
                "hook": self.hook,
                "d_in": self.d_in,
                "dtype": self.dtype,
                "rows_per_chunk": self.rows_per_chunk,
                "n_chunks": len(self.chunks),
                "n_rows": n,
                "heldout_rows": int(heldout),
                "chunks": self.chunks,
                "mean": mean.tolist(),
                "mean_norm": self._sum_norm / n,
                "mean_sq_norm": self._sum_sq_norm / n,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "library_versions": library_versions(),
            }
            if self.tokenizer and all("tokens" in c for c in self.chunks):  # a resumed pre-tokens store has none
                manifest["tokens"] = {"tokenizer": self.tokenizer, "columns": list(TOKEN_COLUMNS)}
            write_json_atomic(self.path / MANIFEST, manifest)
            (self.path / PROGRESS).unlink(missing_ok=True)
            self._closed = True
        return ActivationStore.open(self.path)
