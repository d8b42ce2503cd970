"""Harvest LM activations into stores: tokens -> TransformerBridge forward with hooks -> chunks.

Content-addressed: each hook's store lives at `cache_root / key`, the key hashing everything that
determines its rows (model, revision, hook, dataset, context_length, n_tokens, dtype, drop_bos).
`get_or_harvest` returns complete stores without booting the model, resumes incomplete ones and
harvests the rest, all hooks that still need rows in one pass over the model.

A transcoder's store is paired: its spec names an output hook too (`hook_out`), and each row is
[input | output], the two activations of one token side by side (the reader's `target_at` = the input's
width), so the pair trains and shuffles as one row. The output hook must run after the input hook.
"""

from __future__ import annotations

import hashlib
import json
import queue
import re
import threading
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from .format import DTYPES, MANIFEST, StoreError, check_dtype
from .lm import boot_model, check_hooks, free_device_memory, iter_contexts, iter_texts, rows_per_context
from .lock import store_lock
from .reader import ActivationStore
from .writer import ChunkWriter


@dataclass(frozen=True)
class HarvestSpec:
    """Everything that determines a store's rows (and so its cache key), for one hook."""

    model: str
    """HF model name or local directory that TransformerBridge.boot_transformers accepts."""
    hook: str
    """TransformerLens hook name, e.g. blocks.3.hook_resid_pre."""
    dataset: str
    """HF dataset name (streamed), or a local .txt file (one document per non-empty line), .jsonl file, or a directory
    of them."""
    n_tokens: int
    """Rows to store (token positions, after dropping BOS positions)."""
    context_length: int = 128
    split: str = "train"
    dataset_config: str | None = None
    text_field: str = "text"
    dtype: str = "float32"
    drop_bos: bool = True
    """Skip the BOS position of every context: its activations are outliers, not text features."""
    revision: str | None = None
    hook_out: str | None = None
    """A transcoder's output hook: rows are then [hook's activation | hook_out's]. None: an SAE store."""

    def record(self) -> dict:
        """The spec as stores record it; an SAE store's has no hook_out, so its key is what it always was."""
        spec = asdict(self)
        if self.hook_out is None:
            del spec["hook_out"]
        return spec

    def key(self) -> str:
        spec = self.record()
        spec["model_files"] = _local_fingerprint(self.model)
        spec["dataset_files"] = _local_fingerprint(self.dataset)
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _local_fingerprint(name: str) -> list | None:
    """For local paths: file names, sizes and mtimes, so edited local data gets a new key."""
    path = Path(name)
    if not path.exists():
        return None
    files = sorted(path.rglob("*")) if path.is_dir() else [path]
    return [
        [str(f.relative_to(path) if path.is_dir() else f.name), f.stat().st_size, f.stat().st_mtime_ns]
        for f in files
        if f.is_file()
    ]


def _stop_layer(hooks: Sequence[str], n_layers: int) -> int | None:
    """Blocks after the last hooked one need not run: stop there when all hooks live in blocks."""
    layers = [re.match(r"blocks\.(\d+)\.", h) for h in hooks]
    if not all(layers):
        return None
    stop = max(int(m.group(1)) for m in layers) + 1
    return stop if stop < n_layers else None


class _Capture:
    """Forward hooks that keep only the requested activations of the current batch."""

    def __init__(self, hooks: Sequence[str]) -> None:
        self.hooks = list(hooks)
        self.acts: dict[str, torch.Tensor] = {}

    def fwd_hooks(self):
        # closures bind the requested name: the bridge reports aliases under their canonical name
        return [(h, lambda act, hook, h=h: self.acts.__setitem__(h, act.detach())) for h in self.hooks]


def _run(bridge, tokens: torch.Tensor, capture: _Capture, stop: int | None) -> dict[str, torch.Tensor]:
    capture.acts.clear()
    with torch.inference_mode():
        try:
            bridge.run_with_hooks(tokens, fwd_hooks=capture.fwd_hooks(), stop_at_layer=stop, return_type=None)
        except ValueError as error:  # the bridge refuses a hook it lists but has switched off (hook_mlp_in, ...)
            raise StoreError(f"Hooks {capture.hooks} cannot be hooked: {error}") from None
    missing = [h for h in capture.hooks if h not in capture.acts]
    if missing:
        raise StoreError(f"Hooks {missing} did not fire in the forward pass; choose hooks this model runs.")
    return dict(capture.acts)


def _rows(act: torch.Tensor, tokens: torch.Tensor, hook: str, drop_first: bool) -> torch.Tensor:
    """[batch, pos, ...] activations -> rows [batch * pos', d_in]."""
    if act.ndim < 3 or tuple(act.shape[:2]) != tuple(tokens.shape):
        raise StoreError(
            f"Hook {hook!r} gives shape {list(act.shape)}, not [batch, pos, ...]; it cannot be stored as rows."
        )
    act = act[:, 1:] if drop_first else act
    return act.reshape(-1, act[0, 0].numel())


def _row_tokens(tokens: torch.Tensor, first_context: int, drop_first: bool) -> torch.Tensor:
    """int32 [batch * pos', 3]: each row's (token id, context index, position), rows in _rows' order (tokens.py)."""
    start = 1 if drop_first else 0
    ids = tokens[:, start:].cpu()
    context = torch.arange(first_context, first_context + len(tokens)).unsqueeze(1).expand_as(ids)
    position = torch.arange(start, tokens.shape[1]).unsqueeze(0).expand_as(ids)
    return torch.stack([ids, context, position], dim=-1).reshape(-1, 3).to(torch.int32)


# ----------------------------------------------------------------------------------------------
# Harvest


class _BackgroundWriter:
    """Writes rows on a thread behind a bounded queue, so disk writes and hashing overlap the forward."""

    def __init__(self, writers: dict[str, ChunkWriter], max_queue: int = 4) -> None:
        self.writers = writers
        self.queue: queue.Queue = queue.Queue(maxsize=max_queue)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="store-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is None:
                try:
                    self.writers[item[0]].write(item[1], item[2])
                except BaseException as e:  # reported to the producer on its next put
                    self.error = e

    def put(self, hook: str, rows: torch.Tensor, tokens: torch.Tensor) -> None:
        if self.error is not None:
            raise self.error
        self.queue.put((hook, rows, tokens))

    def finish(self) -> None:
        self.queue.put(None)
        self.thread.join()
        if self.error is not None:
            raise self.error


def store_dir(spec: HarvestSpec, cache_root: str | Path) -> Path:
    return Path(cache_root) / spec.key()


def get_or_harvest(
    model: str,
    hooks: str | Sequence[str],
    dataset: str,
    *,
    cache_root: str | Path,
    n_tokens: int,
    context_length: int = 128,
    split: str = "train",
    dataset_config: str | None = None,
    text_field: str = "text",
    dtype: str = "float32",
    drop_bos: bool = True,
    revision: str | None = None,
    device: str = "cpu",
    batch_size: int = 16,
    rows_per_chunk: int = 65_536,
    heldout_rows: int | None = None,
    progress: bool = True,
    hooks_out: Sequence[str | None] | None = None,
) -> dict[str, ActivationStore]:
    """Return {hook: ActivationStore}: reuse complete stores, resume incomplete ones, harvest the rest.

    `hooks_out`, aligned with `hooks`, makes each hook with an output hook a transcoder's paired store (the
    module doc). batch_size is contexts per forward pass; rows_per_chunk and heldout_rows only shape the files
    (they are not part of the key, so change them only for a new cache_root).
    """
    hooks = [hooks] if isinstance(hooks, str) else list(hooks)
    if not hooks or len(set(hooks)) != len(hooks):
        raise StoreError(f"hooks must be a non-empty list of distinct hook names, got {hooks}.")
    hooks_out = [None] * len(hooks) if hooks_out is None else list(hooks_out)
    if len(hooks_out) != len(hooks):
        raise StoreError(f"hooks_out={hooks_out} must name one output hook (or None) for each of hooks={hooks}.")
    check_dtype(dtype)
    if n_tokens <= 0 or context_length < 2:
        raise StoreError(f"n_tokens ({n_tokens}) must be positive and context_length ({context_length}) at least 2.")
    specs = {
        h: HarvestSpec(
            model,
            h,
            dataset,
            n_tokens,
            context_length,
            split,
            dataset_config,
            text_field,
            dtype,
            drop_bos,
            revision,
            out,
        )
        for h, out in zip(hooks, hooks_out)
    }
    dirs = {h: store_dir(s, cache_root) for h, s in specs.items()}
    with store_lock(list(dirs.values())):
        stores = {h: ActivationStore.open(d) for h, d in dirs.items() if (d / MANIFEST).exists()}
        todo = [h for h in hooks if h not in stores]
        if todo:
            bridge = boot_model(model, device=device, revision=revision)
            try:
                stores.update(
                    harvest(
                        bridge,
                        {h: specs[h] for h in todo},
                        {h: dirs[h] for h in todo},
                        device=device,
                        batch_size=batch_size,
                        rows_per_chunk=rows_per_chunk,
                        heldout_rows=heldout_rows,
                        progress=progress,
                    )
                )
            finally:
                del bridge  # training starts next: the model must not keep its device memory
                free_device_memory(device)
    return {h: stores[h] for h in hooks}


def harvest(
    bridge,
    specs: dict[str, HarvestSpec],
    dirs: dict[str, Path],
    *,
    device: str = "cpu",
    batch_size: int = 16,
    rows_per_chunk: int = 65_536,
    heldout_rows: int | None = None,
    progress: bool = True,
) -> dict[str, ActivationStore]:
    """Run the model once over the dataset, writing one store per hook (resuming where they stopped)."""
    from tqdm.auto import tqdm

    hooks = list(specs)
    spec = specs[hooks[0]]  # all specs share everything but the hooks
    captured = list(dict.fromkeys(h for s in specs.values() for h in (s.hook, s.hook_out) if h))
    check_hooks(bridge, captured)
    tokenizer = bridge.tokenizer
    drop_first = spec.drop_bos and tokenizer.bos_token_id is not None
    context_rows = rows_per_context(tokenizer, spec.context_length, spec.drop_bos)
    stop = _stop_layer(captured, bridge.cfg.n_layers)
    capture = _Capture(captured)

    # one tiny probe forward gives each hook's width (and the order hooks fire in) before any writer exists
    probe_tokens = torch.zeros(1, 2, dtype=torch.long, device=device)
    probe = _run(bridge, probe_tokens, capture, stop)
    fired = list(probe)  # in the order the hooks ran
    for h, out in ((h, specs[h].hook_out) for h in hooks):
        if out is not None and fired.index(out) <= fired.index(h):
            raise StoreError(
                f"data.hooks_out: {out!r} runs before its input hook {h!r} (or is it) in the forward pass; a "
                "transcoder maps an activation to a later one"
            )
    writers = {}
    for h in hooks:
        d_in = _rows(probe[h], probe_tokens, h, False).shape[1]
        source = {"kind": "lm", **specs[h].record(), "key": specs[h].key()}
        if (out := specs[h].hook_out) is not None:
            source.update(d_in=d_in, d_out=_rows(probe[out], probe_tokens, out, False).shape[1])
        writers[h] = ChunkWriter(
            dirs[h],
            d_in + source.get("d_out", 0),
            spec.dtype,
            rows_per_chunk,
            source=source,
            hook=h,
            heldout_rows=heldout_rows,
            tokenizer={"name": spec.model, "revision": spec.revision},
        )

    # rows are a deterministic stream: skip whole contexts every hook already has, trim the rest per hook
    done = {h: writers[h].resume_rows for h in hooks}
    skip_contexts = min(done.values()) // context_rows
    row = skip_contexts * context_rows  # global index of the next row produced
    contexts = iter_contexts(
        iter_texts(spec.dataset, spec.split, spec.dataset_config, spec.text_field), tokenizer, spec.context_length
    )
    n_seen = 0
    for _ in range(skip_contexts):
        if next(contexts, None) is None:
            break
        n_seen += 1

    bar = tqdm(total=spec.n_tokens, initial=row, unit="tok", unit_scale=True, desc="harvest", disable=not progress)
    background = _BackgroundWriter(writers)
    try:
        while row < spec.n_tokens:
            batch = [c for _, c in zip(range(batch_size), contexts)]
            if not batch:
                where = (
                    "is empty" if n_seen == 0 else f"ran out after {n_seen} contexts ({row} rows of {spec.n_tokens})"
                )
                raise StoreError(f"Dataset {spec.dataset!r} {where}; use more text or a smaller n_tokens.")
            n_seen += len(batch)
            tokens = torch.tensor(batch, dtype=torch.long, device=device)  # [batch, context_length]
            acts = _run(bridge, tokens, capture, stop)
            n_new = min(len(batch) * context_rows, spec.n_tokens - row)
            row_tokens = _row_tokens(tokens, n_seen - len(batch), drop_first)[:n_new]
            for h in hooks:
                rows = _rows(acts[h], tokens, h, drop_first)[:n_new]
                if (out := specs[h].hook_out) is not None:
                    rows = torch.cat([rows, _rows(acts[out], tokens, out, drop_first)[:n_new]], dim=1)
                skip = max(0, done[h] - row)
                if skip < n_new:
                    background.put(h, rows[skip:].to("cpu", DTYPES[spec.dtype][2]), row_tokens[skip:])
            row += n_new
            bar.update(n_new)
        background.finish()
    except BaseException:
        background.error = background.error or RuntimeError("harvest stopped")  # drop queued rows
        background.queue.put(None)
        background.thread.join()
        raise
    finally:
        bar.close()
    return {h: writers[h].close() for h in hooks}
