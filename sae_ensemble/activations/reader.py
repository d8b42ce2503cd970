"""ActivationStore: a complete store opened read-only, its chunks memory-mapped, never copied whole.

Opening validates the manifest and every chunk against the format (format.py); rows are gathered
by global index, and the held-out rows, normalisation and ground truth are read from here.
The shuffled training stream over a store is stream.py's train_batches.
"""

from __future__ import annotations

import hashlib
import json
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from sae_ensemble.activations.format import (
    DTYPES,
    GROUND_TRUTH,
    MANIFEST,
    NORMALIZE_MODES,
    PROGRESS,
    READABLE_FORMATS,
    TENSOR_NAME,
    VERIFY_MODES,
    StoreError,
    heldout_per_chunk,
    read_chunk_header,
    sha256_file,
)
from sae_ensemble.activations.truth import load_truth, true_codes
from sae_ensemble.atomic import write_json_atomic


class ActivationStore:
    """A complete store opened read-only. Chunk data is memory-mapped, never copied whole."""

    def __init__(self, path: Path, manifest: dict, data_offsets: list[int]) -> None:
        self.path = path
        self.manifest = manifest
        self.d_in: int = manifest["d_in"]
        source = manifest.get("source") or {}
        # A paired store (transcoders' ground truth, synthetic.py) holds rows [x | y]: the target from this column.
        self.target_at: int = int(source.get("d_in", 0)) if source.get("d_out") else 0
        self.dtype: str = manifest["dtype"]
        self.n_rows: int = manifest["n_rows"]
        self.heldout_rows: int = manifest["heldout_rows"]
        self.n_train_rows: int = self.n_rows - self.heldout_rows
        self._chunk_rows = np.array([c["rows"] for c in manifest["chunks"]], dtype=np.int64)
        self.chunk_starts = np.concatenate([[0], np.cumsum(self._chunk_rows)])  # global row of each chunk
        self._data_offsets = data_offsets
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._tokens = None
        self._truth: dict[str, torch.Tensor] | None = None
        # training rows of each chunk: [0, train) within the chunk, the rest held out; chunks wholly held out drop out
        self._heldout_chunk_rows = heldout_per_chunk(self._chunk_rows, self.heldout_rows, manifest["format_version"])
        train_rows = self._chunk_rows - self._heldout_chunk_rows
        self.train_chunks = np.flatnonzero(train_rows > 0)  # what train_batches (stream.py) shuffles
        self.train_chunk_rows = train_rows[self.train_chunks]

    # -- opening and validation ---------------------------------------------------------------

    @classmethod
    def open(cls, path: str | Path, verify: str = "size") -> ActivationStore:
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
                raise StoreError(
                    f"Store {path} is incomplete (no {MANIFEST}, writing was interrupted); "
                    f"re-run the harvest or writer to resume it."
                )
            raise StoreError(
                f"Store {path} is incomplete or not a store: it has no {MANIFEST}; "
                f"re-run the harvest or writer to (re)build it."
            )
        try:
            manifest = json.loads(manifest_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise StoreError(f"Manifest {manifest_path} is not valid JSON ({e}).") from None
        cls._check_manifest(manifest_path, manifest)
        code, np_dtype, _ = DTYPES[manifest["dtype"]]
        offsets = []
        for c in manifest["chunks"]:
            chunk_path = path / c["file"]
            if not chunk_path.is_file():
                raise StoreError(f"Chunk {chunk_path} listed in the manifest is missing.")
            size = chunk_path.stat().st_size
            if size != c["bytes"]:
                raise StoreError(
                    f"Chunk {chunk_path} has {size} bytes but the manifest says {c['bytes']}; "
                    f"it is truncated or corrupt."
                )
            start, header = read_chunk_header(chunk_path)
            tensors = {k: v for k, v in header.items() if k != "__metadata__"}
            if list(tensors) != [TENSOR_NAME]:
                raise StoreError(
                    f"Chunk {chunk_path} holds tensors {sorted(tensors)}; expected exactly one named {TENSOR_NAME!r}."
                )
            info = tensors[TENSOR_NAME]
            expected_shape = [c["rows"], manifest["d_in"]]
            if info.get("shape") != expected_shape:
                raise StoreError(
                    f"Chunk {chunk_path} has shape {info.get('shape')} "
                    f"but the manifest says {expected_shape} (rows, d_in)."
                )
            if info.get("dtype") != code:
                raise StoreError(
                    f"Chunk {chunk_path} has dtype {info.get('dtype')} "
                    f"but the manifest says {manifest['dtype']} ({code})."
                )
            lo, hi = info.get("data_offsets", [None, None])
            if lo is None or hi - lo != c["rows"] * manifest["d_in"] * np_dtype.itemsize or start + hi != size:
                raise StoreError(
                    f"Chunk {chunk_path} has data offsets {info.get('data_offsets')} "
                    f"that do not match its shape and file size."
                )
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
        recorded = self.manifest.get("verified", {}).get("chunks")
        if mode == "size" or (mode == "once" and recorded == self._chunk_stats()):
            return
        for index, c in enumerate(self.manifest["chunks"]):
            chunk_path = self.path / c["file"]
            sha = sha256_file(chunk_path)
            if sha != c["sha256"]:
                raise StoreError(
                    f"Chunk {chunk_path} has sha256 {sha[:12]}… but the manifest says {c['sha256'][:12]}…; "
                    f"it is corrupt "
                    f"(rebuild the store, or restore that file from a good copy)."
                )
            tokens = c.get("tokens")
            if tokens and sha256_file(self.path / tokens["file"]) != tokens["sha256"]:
                raise StoreError(
                    f"Tokens file {self.path / tokens['file']} does not match the sha256 in the manifest; it is "
                    "corrupt (rebuild the store)."
                )
            bad = self._first_nonfinite_row(index)
            if bad is not None:
                raise StoreError(
                    f"Row {bad} of chunk {chunk_path} (row {int(self.chunk_starts[index]) + bad} of the store) holds a "
                    f"non-finite value (nan or inf); stores hold finite rows only: rebuild it from its source."
                )
        self.manifest["verified"] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "chunks": self._chunk_stats()}
        try:
            write_json_atomic(self.path / MANIFEST, self.manifest)
        except OSError as error:  # a read-only store is still usable: it is checked again next time
            warnings.warn(
                f"store {self.path} verified but the result could not be recorded in {MANIFEST} ({error.strerror})",
                stacklevel=2,
            )

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
        required = (
            "format_version",
            "d_in",
            "dtype",
            "n_rows",
            "heldout_rows",
            "n_chunks",
            "chunks",
            "mean",
            "mean_norm",
        )
        missing = [k for k in required if k not in m]
        if missing:
            raise StoreError(f"Manifest {manifest_path} lacks the fields {missing}.")
        if m["format_version"] not in READABLE_FORMATS:
            raise StoreError(
                f"Manifest {manifest_path} has format_version {m['format_version']}; "
                f"this code reads {list(READABLE_FORMATS)}."
            )
        if m["dtype"] not in DTYPES:
            raise StoreError(f"Manifest {manifest_path} has dtype {m['dtype']!r}; expected one of {sorted(DTYPES)}.")
        if not isinstance(m["d_in"], int) or m["d_in"] <= 0:
            raise StoreError(f"Manifest {manifest_path} has d_in={m['d_in']!r}; expected a positive integer.")
        if len(m["chunks"]) != m["n_chunks"] or sum(c["rows"] for c in m["chunks"]) != m["n_rows"]:
            raise StoreError(f"Manifest {manifest_path} is inconsistent: n_chunks/n_rows do not match its chunk list.")
        if len(m["mean"]) != m["d_in"]:
            raise StoreError(
                f"Manifest {manifest_path} has a mean of length {len(m['mean'])}; expected d_in={m['d_in']}."
            )
        if not 0 <= m["heldout_rows"] < m["n_rows"]:
            raise StoreError(
                f"Manifest {manifest_path} has heldout_rows={m['heldout_rows']}; "
                f"expected 0 <= heldout_rows < n_rows={m['n_rows']}."
            )

    # -- raw access -----------------------------------------------------------------------------

    def _chunk(self, index: int) -> np.ndarray:
        """The memmap [rows, d_in] of one chunk (read-only; bfloat16 appears as uint16)."""
        array = self._maps.get(index)
        if array is None:
            np_dtype = DTYPES[self.dtype][1]
            array = np.memmap(
                self.path / self.manifest["chunks"][index]["file"],
                dtype=np_dtype,
                mode="r",
                offset=self._data_offsets[index],
                shape=(int(self._chunk_rows[index]), self.d_in),
            )
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
        bounds = np.searchsorted(sorted_rows, self.chunk_starts)  # where each chunk's rows begin
        for c in np.flatnonzero(bounds[1:] > bounds[:-1]):
            lo, hi = bounds[c], bounds[c + 1]
            np.take(self._chunk(c), sorted_rows[lo:hi] - self.chunk_starts[c], axis=0, out=raw[lo:hi])
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

    def normalizer(self, normalize: str, device: str | torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
        """The function that normalises float32 rows already on `device` (see `normalization`)."""
        shift, scale = self.normalization(normalize)
        if normalize == "none":
            return lambda x: x
        shift = shift.to(device)
        return lambda x: (x - shift) / scale if scale != 1.0 else x - shift

    def batches_per_epoch(self, batch_size: int) -> int:
        return self.n_train_rows // batch_size

    # -- evaluation data --------------------------------------------------------------------------

    def heldout_indices(self) -> np.ndarray:
        """Global indices of the held-out rows [heldout_rows], interleaved across chunks (the j-th held-out row
        of every chunk, then the (j+1)-th, ...), so that any prefix samples every chunk's tail."""
        ends = self.chunk_starts[1:]
        rows = [np.arange(end - h, end) for end, h in zip(ends, self._heldout_chunk_rows)]
        within = np.concatenate([np.arange(len(r)) for r in rows]) if rows else np.zeros(0, np.int64)
        rows = np.concatenate(rows) if rows else np.zeros(0, np.int64)
        return rows[np.argsort(within, kind="stable")]

    def heldout(
        self, max_rows: int | None = None, device: str | torch.device = "cpu", normalize: str = "none"
    ) -> torch.Tensor:
        """The held-out rows (`heldout_indices`, the first max_rows of them) as float32 [R, d_in]."""
        n = self.heldout_rows if max_rows is None else min(max_rows, self.heldout_rows)
        x = self.rows(self.heldout_indices()[:n])
        return self.normalizer(normalize, device)(x.to(device))

    @property
    def has_tokens(self) -> bool:
        """Whether the store keeps each row's token (tokens.py): LM stores harvested since #35."""
        return "tokens" in self.manifest

    def tokens(self):
        """The rows' tokens (tokens.StoreTokens: `.rows(indices)` -> (token id, context, position)); a StoreError
        saying plainly why when the store has none. Checked and mapped on first use."""
        if self._tokens is None:
            from sae_ensemble.activations.tokens import open_tokens

            self._tokens = open_tokens(self.path, self.manifest, self.chunk_starts)
        return self._tokens

    def ground_truth(self) -> torch.Tensor | None:
        """Synthetic stores: the true feature directions float32 [n_features, d_in] (a paired store: those of the
        target, [n_features, d_out]; `paired_truth` has the rest); else None."""
        truth = self.paired_truth() if self.target_at else self._truth_file()
        return None if truth is None else truth["features_out" if self.target_at else "features"]

    def true_codes(self, rows: np.ndarray, dense: bool = False) -> torch.Tensor:
        """Synthetic stores: the true codes of held-out `rows` (global indices; see heldout_indices) as float32
        [len(rows), n_features], sparse COO or dense; a one-line StoreError when the store keeps none (truth.py)."""
        return true_codes(self.truth_tensors(), self.path, rows, dense)

    def truth_tensors(self) -> dict[str, torch.Tensor]:
        """ground_truth.safetensors' tensors as stored ({} without one), read once per open store."""
        if self._truth is None:
            self._truth = load_truth(self.path)
        return self._truth

    def paired_truth(self) -> dict[str, torch.Tensor] | None:
        """A synthetic paired store's truth: `features` [F, d_in] of the input, `features_out` [F, d_out] of the
        target, `skip` [d_out, d_in] (zeros without a true skip); None for a harvested pair, which has none."""
        truth = self._truth_file()
        if truth is None and self.manifest.get("source", {}).get("kind") == "lm":
            return None
        d_out = self.d_in - self.target_at
        shapes = {"features": (None, self.target_at), "features_out": (None, d_out), "skip": (d_out, self.target_at)}
        if truth is None or not all(
            name in truth and truth[name].ndim == 2 and all(a in (None, b) for a, b in zip(shape, truth[name].shape))
            for name, shape in shapes.items()
        ):
            raise StoreError(f"{self.path / GROUND_TRUTH} must hold a paired store's {', '.join(shapes)}.")
        return truth

    def _truth_file(self) -> dict[str, torch.Tensor] | None:
        path = self.path / GROUND_TRUTH
        if not self.truth_tensors():
            return None
        # the directions only: the held-out codes and the world's other records stay as stored
        tensors = {k: v.float() for k, v in self.truth_tensors().items() if k in ("features", "features_out", "skip")}
        width = self.target_at or self.d_in
        if "features" not in tensors or tensors["features"].ndim != 2 or tensors["features"].shape[1] != width:
            raise StoreError(f"{path} must hold one tensor 'features' of shape [n_features, {width}].")
        return tensors

    @property
    def fingerprint(self) -> str:
        """A short hash of the store's content (chunk checksums, dtype, d_in, heldout split)."""
        m = self.manifest
        # format 1's hashes stay as they were
        split = [m["heldout_rows"]] if m["format_version"] == 1 else [m["heldout_rows"], "chunk_tails"]
        key = json.dumps([m["d_in"], m["dtype"], *split, [c["sha256"] for c in m["chunks"]]])
        return hashlib.sha256(key.encode()).hexdigest()[:16]

    def __repr__(self) -> str:
        return (
            f"ActivationStore({str(self.path)!r}, n_rows={self.n_rows}, d_in={self.d_in}, "
            f"dtype={self.dtype}, heldout_rows={self.heldout_rows})"
        )
