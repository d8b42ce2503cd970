"""The activation store: chunked safetensors on disk, written resumably, read zero-copy.

A store is a directory:
    manifest.json              written LAST by ChunkWriter.close(); no manifest = incomplete store
    chunk_NNNNN.safetensors    one tensor `activations` [rows, d_in] (float32, float16 or bfloat16)
    progress.json              only while writing: completed chunks and running sums, for resume
    ground_truth.safetensors   synthetic stores only: `features` [n_features, d_in]

`heldout_rows` rows are held out for evaluation and never appear in train_batches: the last rows of
every chunk, in proportion to its size (format 2), so they sample the whole source, not only its end.
See docs/store.md for the format, the shuffling scheme and the zero-copy reasoning.
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
import time
import warnings
from collections import OrderedDict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sae_ensemble.activations.lock import store_lock  # noqa: F401 - synthesis and harvest take it from here
from sae_ensemble.atomic import atomic_write, write_json_atomic

FORMAT_VERSION = 2
# format 1 held out the store's last heldout_rows rows; format 2 holds out the tail of every chunk.
# Both read alike otherwise, so format-1 stores stay readable with their own split.
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
GROUND_TRUTH = "ground_truth.safetensors"
TENSOR_NAME = "activations"
DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_HELDOUT_CAP = 65_536
DEFAULT_WINDOW_CHUNKS = 4
NORMALIZE_MODES = ("none", "center", "center_scale")
# How ActivationStore.open checks chunks beyond their size and header: size = nothing more;
# once = sha256 and finiteness of every row, unless the manifest records a pass on the same files;
# checksum = sha256 and finiteness every time.
VERIFY_MODES = ("size", "once", "checksum")

# store dtype -> (safetensors dtype code, numpy dtype used for the memmap, torch dtype)
# bfloat16 has no numpy dtype: it is mapped as uint16 and reinterpreted by torch.
DTYPES = {
    "float32": ("F32", np.dtype("<f4"), torch.float32),
    "float16": ("F16", np.dtype("<f2"), torch.float16),
    "bfloat16": ("BF16", np.dtype("<u2"), torch.bfloat16),
}


class StoreError(ValueError):
    """A store (or the input to one) is missing, incomplete, corrupt or inconsistent."""


def chunk_name(index: int) -> str:
    return f"chunk_{index:05d}.safetensors"


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise StoreError(f"Store dtype {dtype!r} is not supported; use one of {sorted(DTYPES)}.")
    return dtype


def heldout_per_chunk(chunk_rows: np.ndarray, heldout_rows: int, format_version: int = FORMAT_VERSION) -> np.ndarray:
    """Held-out rows at the end of each chunk [n_chunks]: the split both the reader and the docs mean.

    Format 2 spreads them in proportion to each chunk's rows (cumulative rounding, so they sum to
    heldout_rows and no chunk gives more than it has): an LM store's source changes along its
    documents, and a held-out set taken from its end alone would measure another distribution than
    training saw. Format 1 held out the store's last rows.
    """
    chunk_rows = np.asarray(chunk_rows, dtype=np.int64)
    ends = np.cumsum(chunk_rows)
    n = int(ends[-1]) if len(ends) else 0
    if format_version == 1:
        return np.clip(ends - (n - heldout_rows), 0, chunk_rows)
    cumulative = (ends * heldout_rows) // max(n, 1)  # held-out rows in chunks 0..c
    return np.diff(np.concatenate([[0], cumulative]))


def _library_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    for name in ("safetensors", "transformer_lens", "transformers"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = module.__version__
    return versions


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------
# Writing


def _write_chunk_file(path: Path, rows: np.ndarray, dtype: str) -> tuple[int, str]:
    """Write `rows` [r, d_in] as a safetensors file via temp file + os.replace; return (bytes, sha256)."""
    code = DTYPES[dtype][0]
    header = {TENSOR_NAME: {"dtype": code, "shape": list(rows.shape), "data_offsets": [0, rows.nbytes]}}
    header_bytes = json.dumps(header, separators=(",", ":")).encode()
    header_bytes += b" " * (-len(header_bytes) % 8)  # keep the data 8-byte aligned, as safetensors does
    prefix = struct.pack("<Q", len(header_bytes)) + header_bytes
    data = memoryview(np.ascontiguousarray(rows)).cast("B")
    digest = hashlib.sha256(prefix)
    digest.update(data)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(prefix)
            f.write(data)

    # fsynced before the rename: the progress file may only name chunks that are really on disk
    atomic_write(path, write)
    return len(prefix) + rows.nbytes, digest.hexdigest()


class ChunkWriter:
    """Accept rows in any batch sizes, write full chunks atomically, resume after an interruption.

    `resume_rows` is the number of rows already stored by an earlier, interrupted writer with the
    same parameters; the producer must skip that many rows before calling `write`.
    `close()` flushes the last partial chunk and writes manifest.json last.
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
    ) -> None:
        self.path = Path(path)
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
        self._filled = 0
        self._closed = False

    def _load_progress(self) -> None:
        progress_path = self.path / PROGRESS
        if progress_path.exists():
            try:
                progress = json.loads(progress_path.read_text())
            except json.JSONDecodeError as e:
                raise StoreError(f"Progress file {progress_path} is not valid JSON ({e}); delete the directory to start over.")
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
        recorded = {c["file"] for c in self.chunks}
        for stale in list(self.path.glob("chunk_*.safetensors*")):
            if stale.name not in recorded:
                stale.unlink()
        for c in self.chunks:
            f = self.path / c["file"]
            if not f.exists() or f.stat().st_size != c["bytes"]:
                raise StoreError(f"Chunk {f} named in {progress_path} is missing or has the wrong size; delete {self.path} to start over.")

    def write(self, rows: torch.Tensor | np.ndarray) -> None:
        """Append rows [n, d_in]; full chunks are written to disk as they fill."""
        if self._closed:
            raise StoreError(f"ChunkWriter for {self.path} is closed; it accepts no more rows.")
        if isinstance(rows, torch.Tensor):
            rows = rows.detach().to("cpu")
            if rows.dtype != DTYPES[self.dtype][2]:
                rows = rows.to(DTYPES[self.dtype][2])
            rows = rows.contiguous()
            rows = rows.view(torch.uint16).numpy() if self.dtype == "bfloat16" else rows.numpy()
        else:
            if self.dtype == "bfloat16":
                rows = torch.from_numpy(np.asarray(rows, dtype=np.float32)).to(torch.bfloat16).view(torch.uint16).numpy()
            rows = np.asarray(rows, dtype=DTYPES[self.dtype][1])
        if rows.ndim != 2 or rows.shape[1] != self.d_in:
            raise StoreError(f"ChunkWriter for {self.path} expects rows of shape [n, {self.d_in}], got {list(rows.shape)}.")
        start = 0
        while start < len(rows):
            take = min(self.rows_per_chunk - self._filled, len(rows) - start)
            self._buffer[self._filled : self._filled + take] = rows[start : start + take]
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
                f"Row {int(bad[0])} of chunk {chunk_name(len(self.chunks))} (row {self.n_rows + int(bad[0])} of store {self.path}) "
                f"holds a non-finite value (nan or inf){f' as do {len(bad) - 1} more rows of that chunk' if len(bad) > 1 else ''}; "
                f"stores hold finite rows only (a float16 store overflows beyond 65504: use dtype=bfloat16 or float32)."
            )
        self._sum += values.sum(axis=0)
        self._sum_norm += float(np.sqrt(sq_norms).sum())
        self._sum_sq_norm += float(sq_norms.sum())
        name = chunk_name(len(self.chunks))
        n_bytes, sha = self._write_chunk(self.path / name, rows)
        self.chunks.append({"file": name, "rows": int(self._filled), "bytes": n_bytes, "sha256": sha})
        self.n_rows += self._filled
        self._filled = 0
        write_json_atomic(
            self.path / PROGRESS,
            {"params": self._params, "chunks": self.chunks, "sum": self._sum.tolist(),
             "sum_norm": self._sum_norm, "sum_sq_norm": self._sum_sq_norm},
        )

    def _write_chunk(self, path: Path, rows: np.ndarray) -> tuple[int, str]:
        return _write_chunk_file(path, rows, self.dtype)  # a method so tests can interrupt it

    def close(self) -> "ActivationStore":
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
                "library_versions": _library_versions(),
            }
            write_json_atomic(self.path / MANIFEST, manifest)
            (self.path / PROGRESS).unlink(missing_ok=True)
            self._closed = True
        return ActivationStore.open(self.path)


# ----------------------------------------------------------------------------------------------
# Reading


def read_chunk_header(path: Path) -> tuple[int, dict]:
    """Parse a safetensors header: return (data region start in bytes, header dict). No tensor is read."""
    try:
        with open(path, "rb") as f:
            raw_len = f.read(8)
            if len(raw_len) < 8:
                raise StoreError(f"Chunk {path} is truncated: it is shorter than the 8-byte safetensors header length.")
            (header_len,) = struct.unpack("<Q", raw_len)
            if header_len > 100_000_000:
                raise StoreError(f"Chunk {path} has an implausible header length {header_len}; the file is corrupt.")
            raw = f.read(header_len)
    except OSError as e:
        raise StoreError(f"Chunk {path} cannot be read ({e.strerror}).")
    if len(raw) < header_len:
        raise StoreError(f"Chunk {path} is truncated inside its safetensors header.")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(f"Chunk {path} has a header that is not valid JSON; the file is corrupt.")
    return 8 + header_len, header


@dataclass(frozen=True)
class Position:
    """Where a train_batches stream stands: the next batch to yield.

    epoch: epoch number; batch: batch index within the epoch; chunk: slot, in this epoch's
    shuffled chunk order, of the first chunk of the window that batch starts in (a consistency
    check: it changes when batch_size, window or store differ from the run that made it).
    """

    epoch: int = 0
    chunk: int = 0
    batch: int = 0

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Position":
        return cls(epoch=int(d["epoch"]), chunk=int(d["chunk"]), batch=int(d["batch"]))


def _rng(*keys: int) -> np.random.Generator:
    # SeedSequence mixes the whole key, so (seed, epoch) and (seed, epoch, window) never collide
    return np.random.default_rng([int(k) for k in keys])


class ActivationStore:
    """A complete store opened read-only. Chunk data is memory-mapped, never copied whole."""

    def __init__(self, path: Path, manifest: dict, data_offsets: list[int]) -> None:
        self.path = path
        self.manifest = manifest
        self.d_in: int = manifest["d_in"]
        self.dtype: str = manifest["dtype"]
        self.n_rows: int = manifest["n_rows"]
        self.heldout_rows: int = manifest["heldout_rows"]
        self.n_train_rows: int = self.n_rows - self.heldout_rows
        self._chunk_rows = np.array([c["rows"] for c in manifest["chunks"]], dtype=np.int64)
        self._chunk_starts = np.concatenate([[0], np.cumsum(self._chunk_rows)])  # global row of each chunk
        self._data_offsets = data_offsets
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        # training rows of each chunk: [0, train) within the chunk, the rest held out; chunks wholly held out drop out
        self._heldout_chunk_rows = heldout_per_chunk(self._chunk_rows, self.heldout_rows, manifest["format_version"])
        train_rows = self._chunk_rows - self._heldout_chunk_rows
        self._train_chunks = np.flatnonzero(train_rows > 0)
        self._train_chunk_rows = train_rows[self._train_chunks]

    # -- opening and validation ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, verify: str = "size") -> "ActivationStore":
        """Validate the manifest and every chunk's size and header, then `verify(verify)` (see VERIFY_MODES)."""
        path = Path(path)
        if verify not in VERIFY_MODES:
            raise StoreError(f"verify={verify!r} is not a mode; use one of {VERIFY_MODES}.")
        if not path.exists():
            raise StoreError(f"Store directory {path} does not exist.")
        if not path.is_dir():
            raise StoreError(f"Store path {path} is a file; a store is a directory with {MANIFEST} and chunk files.")
        manifest_path = path / MANIFEST
        if not manifest_path.exists():
            if (path / PROGRESS).exists():
                raise StoreError(f"Store {path} is incomplete (no {MANIFEST}, writing was interrupted); re-run the harvest or writer to resume it.")
            raise StoreError(f"Store {path} is incomplete or not a store: it has no {MANIFEST}; re-run the harvest or writer to (re)build it.")
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"Manifest {manifest_path} is not valid JSON ({e}).")
        cls._check_manifest(manifest_path, manifest)
        code, np_dtype, _ = DTYPES[manifest["dtype"]]
        offsets = []
        for c in manifest["chunks"]:
            chunk_path = path / c["file"]
            if not chunk_path.is_file():
                raise StoreError(f"Chunk {chunk_path} listed in the manifest is missing.")
            size = chunk_path.stat().st_size
            if size != c["bytes"]:
                raise StoreError(f"Chunk {chunk_path} has {size} bytes but the manifest says {c['bytes']}; it is truncated or corrupt.")
            start, header = read_chunk_header(chunk_path)
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            if list(tensors) != [TENSOR_NAME]:
                raise StoreError(f"Chunk {chunk_path} holds tensors {sorted(tensors)}; expected exactly one named {TENSOR_NAME!r}.")
            info = tensors[TENSOR_NAME]
            expected_shape = [c["rows"], manifest["d_in"]]
            if info.get("shape") != expected_shape:
                raise StoreError(f"Chunk {chunk_path} has shape {info.get('shape')} but the manifest says {expected_shape} (rows, d_in).")
            if info.get("dtype") != code:
                raise StoreError(f"Chunk {chunk_path} has dtype {info.get('dtype')} but the manifest says {manifest['dtype']} ({code}).")
            lo, hi = info.get("data_offsets", [None, None])
            if lo is None or hi - lo != c["rows"] * manifest["d_in"] * np_dtype.itemsize or start + hi != size:
                raise StoreError(f"Chunk {chunk_path} has data offsets {info.get('data_offsets')} that do not match its shape and file size.")
            offsets.append(start + lo)
        store = cls(path, manifest, offsets)
        store.verify(verify)
        return store

    def verify(self, mode: str = "once") -> None:
        """Check every chunk's sha256 against the manifest and that every row is finite (see VERIFY_MODES).

        A passed check is recorded in the manifest (`verified`: when, and each chunk's size and
        mtime); mode "once" skips the check while that record still matches the files. Any
        write to a chunk (a flipped byte included) changes its mtime, and so does a copy
        (unless cp -p), so a modified or copied store is checked again.
        """
        if mode not in VERIFY_MODES:
            raise StoreError(f"verify={mode!r} is not a mode; use one of {VERIFY_MODES}.")
        if mode == "size" or (mode == "once" and self.manifest.get("verified", {}).get("chunks") == self._chunk_stats()):
            return
        for index, c in enumerate(self.manifest["chunks"]):
            chunk_path = self.path / c["file"]
            sha = _sha256_file(chunk_path)
            if sha != c["sha256"]:
                raise StoreError(f"Chunk {chunk_path} has sha256 {sha[:12]}… but the manifest says {c['sha256'][:12]}…; it is corrupt "
                                 f"(rebuild the store, or restore that file from a good copy).")
            bad = self._first_nonfinite_row(index)
            if bad is not None:
                raise StoreError(f"Row {bad} of chunk {chunk_path} (row {int(self._chunk_starts[index]) + bad} of the store) holds a "
                                 f"non-finite value (nan or inf); stores hold finite rows only: rebuild it from its source.")
        self.manifest["verified"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "chunks": self._chunk_stats()}
        try:
            write_json_atomic(self.path / MANIFEST, self.manifest)
        except OSError as error:  # a read-only store is still usable: it is checked again next time
            warnings.warn(f"store {self.path} verified but the result could not be recorded in {MANIFEST} ({error.strerror})")

    def _chunk_stats(self) -> list[list[int]]:
        """[size, mtime_ns] of every chunk file: what a recorded verification vouches for."""
        stats = [(self.path / c["file"]).stat() for c in self.manifest["chunks"]]
        return [[st.st_size, st.st_mtime_ns] for st in stats]

    def _first_nonfinite_row(self, index: int, block_rows: int = 8192) -> int | None:
        """Index within chunk `index` of its first row holding nan or inf, or None."""
        chunk = self._chunk(index)
        for lo in range(0, len(chunk), block_rows):
            block = chunk[lo : lo + block_rows]
            if self.dtype == "float32":
                finite = np.isfinite(block)
            else:  # float16 / bfloat16 as uint16: non-finite iff every exponent bit is set
                exponent = np.uint16(0x7C00 if self.dtype == "float16" else 0x7F80)
                finite = (block & exponent) != exponent
            bad = np.flatnonzero(~finite.all(axis=1))
            if len(bad):
                return lo + int(bad[0])
        return None

    @staticmethod
    def _check_manifest(manifest_path: Path, m: dict) -> None:
        required = ("format_version", "d_in", "dtype", "n_rows", "heldout_rows", "n_chunks", "chunks", "mean", "mean_norm")
        missing = [k for k in required if k not in m]
        if missing:
            raise StoreError(f"Manifest {manifest_path} lacks the fields {missing}.")
        if m["format_version"] not in READABLE_FORMATS:
            raise StoreError(f"Manifest {manifest_path} has format_version {m['format_version']}; this code reads {list(READABLE_FORMATS)}.")
        if m["dtype"] not in DTYPES:
            raise StoreError(f"Manifest {manifest_path} has dtype {m['dtype']!r}; expected one of {sorted(DTYPES)}.")
        if not isinstance(m["d_in"], int) or m["d_in"] <= 0:
            raise StoreError(f"Manifest {manifest_path} has d_in={m['d_in']!r}; expected a positive integer.")
        if len(m["chunks"]) != m["n_chunks"] or sum(c["rows"] for c in m["chunks"]) != m["n_rows"]:
            raise StoreError(f"Manifest {manifest_path} is inconsistent: n_chunks/n_rows do not match its chunk list.")
        if len(m["mean"]) != m["d_in"]:
            raise StoreError(f"Manifest {manifest_path} has a mean of length {len(m['mean'])}; expected d_in={m['d_in']}.")
        if not 0 <= m["heldout_rows"] < m["n_rows"]:
            raise StoreError(f"Manifest {manifest_path} has heldout_rows={m['heldout_rows']}; expected 0 <= heldout_rows < n_rows={m['n_rows']}.")

    # -- raw access -----------------------------------------------------------------------------

    def _chunk(self, index: int) -> np.ndarray:
        """The memmap [rows, d_in] of one chunk (read-only; bfloat16 appears as uint16)."""
        array = self._maps.get(index)
        if array is None:
            np_dtype = DTYPES[self.dtype][1]
            array = np.memmap(self.path / self.manifest["chunks"][index]["file"], dtype=np_dtype, mode="r",
                              offset=self._data_offsets[index], shape=(int(self._chunk_rows[index]), self.d_in))
            self._maps[index] = array
            if len(self._maps) > 256:  # each map holds a file descriptor; bound them
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(index)
        return array

    def rows(self, global_rows: np.ndarray, buffer: np.ndarray | None = None) -> torch.Tensor:
        """Float32 rows [len(global_rows), d_in] by global row index, in the order given.

        Rows are gathered chunk by chunk in sorted order (sequential page access) into `buffer`
        (reused across batches, so the allocator does not churn), then permuted back.
        """
        global_rows = np.asarray(global_rows, dtype=np.int64)
        order = np.argsort(global_rows, kind="stable")
        sorted_rows = global_rows[order]
        n = len(sorted_rows)
        if buffer is None or len(buffer) < n:
            buffer = np.empty((n, self.d_in), dtype=DTYPES[self.dtype][1])
        raw = buffer[:n]
        bounds = np.searchsorted(sorted_rows, self._chunk_starts)  # where each chunk's rows begin
        for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
            lo, hi = bounds[c], bounds[c + 1]
            np.take(self._chunk(c), sorted_rows[lo:hi] - self._chunk_starts[c], axis=0, out=raw[lo:hi])
        inverse = np.empty_like(order)
        inverse[order] = np.arange(n)  # sorted position of each requested row
        picked = torch.from_numpy(raw)[torch.from_numpy(inverse)]  # the only copy we hand out
        if self.dtype == "bfloat16":
            picked = picked.view(torch.bfloat16)
        return picked.float()

    # -- normalisation ----------------------------------------------------------------------------

    def normalization(self, normalize: str = "none") -> tuple[torch.Tensor, float]:
        """(shift [d_in], scale) such that normalised = (x - shift) / scale.

        center: subtract the store mean. center_scale: also divide by sqrt(E‖x - mean‖² / d_in),
        so centred rows have mean squared norm d_in (unit variance per dimension on average).
        Statistics cover all rows (training and held out), computed at write time.
        """
        if normalize not in NORMALIZE_MODES:
            raise StoreError(f"normalize={normalize!r} is not a mode; use one of {NORMALIZE_MODES}.")
        mean = torch.tensor(self.manifest["mean"], dtype=torch.float32)
        if normalize == "none":
            return torch.zeros_like(mean), 1.0
        if normalize == "center":
            return mean, 1.0
        centred_sq = self.manifest["mean_sq_norm"] - float(mean.double().square().sum())
        return mean, float(max(centred_sq, 1e-12) / self.d_in) ** 0.5

    def _normalizer(self, normalize: str, device: str | torch.device):
        shift, scale = self.normalization(normalize)
        if normalize == "none":
            return lambda x: x
        shift = shift.to(device)
        return lambda x: (x - shift) / scale if scale != 1.0 else x - shift

    # -- training stream --------------------------------------------------------------------------

    def _epoch_windows(self, seed: int, epoch: int, window: int) -> tuple[np.ndarray, np.ndarray]:
        """This epoch's chunk order (indices into the training chunks) and each window's first row."""
        chunk_order = _rng(seed, epoch).permutation(len(self._train_chunks))
        sizes = [int(self._train_chunk_rows[chunk_order[w : w + window]].sum()) for w in range(0, len(chunk_order), window)]
        return chunk_order, np.concatenate([[0], np.cumsum(sizes)])

    def _window_rows(self, seed: int, epoch: int, w: int, chunk_order: np.ndarray, window: int) -> np.ndarray:
        """Global row indices of window w, shuffled within the window."""
        slots = chunk_order[w * window : (w + 1) * window]
        rows = np.concatenate([np.arange(self._chunk_starts[c], self._chunk_starts[c] + n)
                               for c, n in zip(self._train_chunks[slots], self._train_chunk_rows[slots])])
        return rows[_rng(seed, epoch, w).permutation(len(rows))]

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.n_train_rows // batch_size

    def train_batches(
        self,
        batch_size: int,
        *,
        seed: int,
        position: Position | dict | None = None,
        device: str | torch.device = "cpu",
        normalize: str = "none",
        window: int = DEFAULT_WINDOW_CHUNKS,
        skip_nonfinite: bool = False,
    ) -> Iterator[tuple[torch.Tensor | None, Position]]:
        """Yield (batch float32 [batch_size, d_in] on device, next Position) forever.

        Per epoch: chunks are shuffled by (seed, epoch); consecutive groups of `window` chunks are
        concatenated and their rows shuffled by (seed, epoch, window index); the epoch is the
        concatenation of these windows, cut into batches (a batch may span windows, never epochs).
        drop_last: the final n_train_rows % batch_size rows of each epoch's order are skipped.
        skip_nonfinite: a batch holding nan or inf is yielded as (None, next Position) instead, checked
        on the CPU before the copy to the device, so a GPU consumer never waits for the check.
        """
        if batch_size <= 0 or window <= 0:
            raise StoreError(f"batch_size ({batch_size}) and window ({window}) must be positive.")
        if batch_size > self.n_train_rows:
            raise StoreError(f"batch_size={batch_size} exceeds the {self.n_train_rows} training rows of store {self.path}.")
        norm = self._normalizer(normalize, device)
        pin = torch.device(device).type == "cuda"
        position = Position.from_dict(position) if isinstance(position, dict) else (position or Position())
        n_batches = self.batches_per_epoch(batch_size)
        epoch, batch = position.epoch, position.batch
        if not 0 <= batch < n_batches:
            raise StoreError(f"Position batch={batch} is outside [0, {n_batches}) for batch_size={batch_size}.")
        buffer = np.empty((batch_size, self.d_in), dtype=DTYPES[self.dtype][1])  # gather space, reused
        first = True
        while True:
            chunk_order, window_starts = self._epoch_windows(seed, epoch, window)
            cache: dict[int, np.ndarray] = {}
            while batch < n_batches:
                lo, hi = batch * batch_size, (batch + 1) * batch_size
                w_lo = int(np.searchsorted(window_starts, lo, side="right")) - 1
                if first and position.chunk != w_lo * window:
                    raise StoreError(
                        f"Position {position.to_dict()} does not fit this stream (expected chunk={w_lo * window}); "
                        f"it was made with another batch_size, window or store."
                    )
                first = False
                w_hi = int(np.searchsorted(window_starts, hi, side="left")) - 1
                parts = []
                for w in range(w_lo, w_hi + 1):
                    if w not in cache:
                        cache = {k: v for k, v in cache.items() if k >= w_lo}  # windows behind us are done
                        cache[w] = self._window_rows(seed, epoch, w, chunk_order, window)
                    a, b = max(lo, window_starts[w]) - window_starts[w], min(hi, window_starts[w + 1]) - window_starts[w]
                    parts.append(cache[w][a:b])
                x = self.rows(np.concatenate(parts), buffer)  # [batch_size, d_in] float32
                if skip_nonfinite and not bool(torch.isfinite(x).all()):
                    x = None
                else:
                    if pin:
                        x = x.pin_memory()
                    x = norm(x.to(device, non_blocking=pin))
                batch += 1
                if batch < n_batches:
                    nxt = Position(epoch, int(np.searchsorted(window_starts, batch * batch_size, side="right") - 1) * window, batch)
                else:
                    nxt = Position(epoch + 1, 0, 0)
                yield x, nxt
            epoch, batch = epoch + 1, 0

    # -- evaluation data --------------------------------------------------------------------------

    def heldout_indices(self) -> np.ndarray:
        """Global indices of the held-out rows [heldout_rows], interleaved across chunks (the j-th held-out row
        of every chunk, then the (j+1)-th, ...), so that any prefix samples every chunk's tail."""
        ends = self._chunk_starts[1:]
        rows = [np.arange(end - h, end) for end, h in zip(ends, self._heldout_chunk_rows)]
        within = np.concatenate([np.arange(len(r)) for r in rows]) if rows else np.zeros(0, np.int64)
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return rows[np.argsort(within, kind="stable")]

    def heldout(self, max_rows: int | None = None, device: str | torch.device = "cpu", normalize: str = "none") -> torch.Tensor:
        """The held-out rows (`heldout_indices`, the first max_rows of them) as float32 [R, d_in]."""
        n = self.heldout_rows if max_rows is None else min(max_rows, self.heldout_rows)
        x = self.rows(self.heldout_indices()[:n])
        return self._normalizer(normalize, device)(x.to(device))

    def ground_truth(self) -> torch.Tensor | None:
        """Synthetic stores: the true feature directions float32 [n_features, d_in]; else None."""
        path = self.path / GROUND_TRUTH
        if not path.exists():
            return None
        from safetensors.torch import load_file  # small file: a copy is fine here

        tensors = load_file(path)
        if "features" not in tensors or tensors["features"].ndim != 2 or tensors["features"].shape[1] != self.d_in:
            raise StoreError(f"{path} must hold one tensor 'features' of shape [n_features, {self.d_in}].")
        return tensors["features"].float()

    @property
    def fingerprint(self) -> str:
        """A short hash of the store's content (chunk checksums, dtype, d_in, heldout split)."""
        m = self.manifest
        split = [m["heldout_rows"]] if m["format_version"] == 1 else [m["heldout_rows"], "chunk_tails"]  # format 1's hashes stay as they were
        key = json.dumps([m["d_in"], m["dtype"], *split, [c["sha256"] for c in m["chunks"]]])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (f"ActivationStore({str(self.path)!r}, n_rows={self.n_rows}, d_in={self.d_in}, "
                f"dtype={self.dtype}, heldout_rows={self.heldout_rows})")
