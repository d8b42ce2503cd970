"""The activation store's on-disk format: chunked safetensors, a manifest written last.

A store is a directory:
    manifest.json              written LAST by ChunkWriter.close(); no manifest = incomplete store
    chunk_NNNNN.safetensors    one tensor `activations` [rows, d_in] (float32, float16 or bfloat16)
    tokens_NNNNN.safetensors   LM stores: one tensor `tokens` int32 [rows, 3], each row's token id, context
                               and position in it (tokens.py; stores harvested before #35 have none)
    progress.json              only while writing: completed chunks and running sums, for resume
    ground_truth.safetensors   synthetic stores only: `features` [n_features, d_in]

`heldout_rows` rows are held out for evaluation and never appear in train_batches: the last rows of
every chunk, in proportion to its size (format 2), so they sample the whole source, not only its end.
See docs/store.md for the format, the shuffling scheme and the zero-copy reasoning.

The store reads and writes in data-flow order: this module (the format), writer.py (ChunkWriter),
reader.py (ActivationStore), stream.py (the shuffled training batches).
"""

from __future__ import annotations

import hashlib
import json
import struct
import sys
from pathlib import Path

import numpy as np
import torch

from sae_ensemble.atomic import atomic_write
from sae_ensemble.config import Normalize, Verify

FORMAT_VERSION = 2
# format 1 held out the store's last heldout_rows rows; format 2 holds out the tail of every chunk.
# Both read alike otherwise, so format-1 stores stay readable with their own split.
READABLE_FORMATS = (1, 2)
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
GROUND_TRUTH = "ground_truth.safetensors"
TENSOR_NAME = "activations"
TOKENS_NAME = "tokens"
TOKEN_COLUMNS = ("token", "context", "position")  # of a tokens file's int32 [rows, 3]
DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_HELDOUT_CAP = 65_536
DEFAULT_WINDOW_CHUNKS = 4
NORMALIZE_MODES = tuple(map(str, Normalize))  # config.Normalize, as plain strings for messages
# How ActivationStore.open checks chunks beyond their size and header: size = nothing more;
# once = sha256 and finiteness of every row, unless the manifest records a pass on the same files;
# checksum = sha256 and finiteness every time.
VERIFY_MODES = tuple(map(str, Verify))

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


def tokens_name(index: int) -> str:
    return f"tokens_{index:05d}.safetensors"


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


def library_versions() -> dict[str, str]:
    """Versions of Python and the libraries that produced a store, for its manifest."""
    versions = {"python": sys.version.split()[0], "torch": torch.__version__, "numpy": np.__version__}
    for name in ("safetensors", "transformer_lens", "transformers"):
        module = sys.modules.get(name)
        if module is not None and hasattr(module, "__version__"):
            versions[name] = module.__version__
    return versions


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            digest.update(block)
    return digest.hexdigest()


def write_chunk_file(path: Path, rows: np.ndarray, dtype: str, name: str = TENSOR_NAME) -> tuple[int, str]:
    """Write `rows` [r, d_in] as a safetensors file of one tensor `name` via temp file + os.replace; return (bytes,
    sha256). dtype: a store dtype, or int32 (a tokens file)."""
    code = "I32" if dtype == "int32" else DTYPES[dtype][0]
    header = {name: {"dtype": code, "shape": list(rows.shape), "data_offsets": [0, rows.nbytes]}}
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
        raise StoreError(f"Chunk {path} cannot be read ({e.strerror}).") from None
    if len(raw) < header_len:
        raise StoreError(f"Chunk {path} is truncated inside its safetensors header.")
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise StoreError(f"Chunk {path} has a header that is not valid JSON; the file is corrupt.") from None
    return 8 + header_len, header
