"""The language model's side of a harvest and of the CE evaluation: texts, token contexts, the booted model, its
hooks."""

from __future__ import annotations

import difflib
import gc
import json
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from .format import StoreError

TEXT_SUFFIXES = (".txt", ".jsonl")


# ----------------------------------------------------------------------------------------------
# Tokens


def iter_texts(
    dataset: str, split: str = "train", dataset_config: str | None = None, text_field: str = "text"
) -> Iterator[str]:
    """Documents from local .txt/.jsonl files (or a directory of them) or a streamed HF dataset."""
    path = Path(dataset)
    if path.exists():
        files = sorted(f for f in path.rglob("*") if f.suffix in TEXT_SUFFIXES) if path.is_dir() else [path]
        if not files or any(f.suffix not in TEXT_SUFFIXES for f in files):
            raise StoreError(f"Dataset path {path} must be a .txt or .jsonl file or a directory holding some.")
        for f in files:
            with open(f, encoding="utf-8") as lines:
                for line_no, line in enumerate(lines, 1):
                    if not line.strip():
                        continue
                    if f.suffix == ".txt":
                        yield line.rstrip("\n")
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError:
                        raise StoreError(f"{f} line {line_no} is not valid JSON.") from None
                    if text_field not in record:
                        raise StoreError(f"{f} line {line_no} has no {text_field!r} field (fields: {sorted(record)}).")
                    yield record[text_field]
        return
    import datasets

    try:
        ds = datasets.load_dataset(dataset, dataset_config, split=split, streaming=True)
    except Exception as e:  # offline, unknown name, bad split: say which
        raise StoreError(
            f"Dataset {dataset!r} (config {dataset_config!r}, split {split!r}) is neither a local path nor loadable: "
            f"{e}"
        ) from None
    for record in ds:
        if text_field not in record:
            raise StoreError(f"Dataset {dataset!r} records have no {text_field!r} field (fields: {sorted(record)}).")
        yield record[text_field]


def iter_contexts(texts: Iterable[str], tokenizer, context_length: int, batch_docs: int = 64) -> Iterator[list[int]]:
    """Pack documents (separated by EOS) into contexts of context_length tokens, each starting with BOS.

    Without a BOS token in the tokenizer, contexts are plain context_length-token windows.
    """
    bos = tokenizer.bos_token_id
    eos = tokenizer.eos_token_id
    body = context_length - (bos is not None)
    buffer: list[int] = []
    docs: list[str] = []

    def drain() -> Iterator[list[int]]:
        nonlocal buffer
        for ids in tokenizer(docs, add_special_tokens=False)["input_ids"]:
            buffer.extend(ids)
            if eos is not None:
                buffer.append(eos)
        docs.clear()
        n_full = len(buffer) // body
        for i in range(n_full):
            piece = buffer[i * body : (i + 1) * body]
            yield [bos, *piece] if bos is not None else piece
        buffer = buffer[n_full * body :]

    for text in texts:
        docs.append(text)
        if len(docs) == batch_docs:
            yield from drain()
    if docs:
        yield from drain()


# ----------------------------------------------------------------------------------------------
# Model and hooks


def boot_model(model: str, device: str = "cpu", revision: str | None = None):
    """Boot a TransformerBridge (a module-level function so tests can check it is not called)."""
    from transformer_lens.model_bridge import TransformerBridge

    kwargs = {"revision": revision} if revision else {}
    try:
        return TransformerBridge.boot_transformers(model, device=device, **kwargs)
    except (OSError, ValueError) as error:  # unknown name, no network, missing files
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise StoreError(
            f"Model {model!r} could not be loaded (an HF model name or a local directory is needed): {first}"
        ) from None


def free_device_memory(device: str | torch.device) -> None:
    """After a model is dropped: collect it (a model holds reference cycles, which refcounting never frees)
    and hand a GPU's cached blocks back, so training gets the memory the model held."""
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def rows_per_context(tokenizer, context_length: int, drop_bos: bool) -> int:
    """Stored rows per context: every position, less the BOS one when it is dropped."""
    return context_length - int(drop_bos and tokenizer.bos_token_id is not None)


def check_hooks(bridge, hooks: Sequence[str]) -> None:
    valid = sorted(bridge.hook_dict)
    for hook in hooks:
        if hook not in bridge.hook_dict:
            close = difflib.get_close_matches(hook, valid, n=5, cutoff=0.5)
            raise StoreError(f"Hook {hook!r} is not a hook of this model; closest valid names: {close or valid[:5]}.")
