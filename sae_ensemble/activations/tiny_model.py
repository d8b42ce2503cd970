"""Tiny local GPT-2s for offline demos and tests: a trained one (`model=tiny`) and a random one.

No downloads. The trained model learns English that every machine has offline: the standard
library's `pydoc_data.topics` plus the second part of the shipped corpus `data/tiny_corpus.txt`.
The corpus's first lines are held out (`Recipe.heldout_corpus_fraction`): the `model=tiny`
harvest and CE evaluation read that file from its start, so with the default `data.n_tokens`
they see only text the model never trained on. Training is deterministic (fixed seeds, a fixed
data order, one CPU thread) and takes about a CPU minute; `ensure_tiny_gpt2` caches the result in a
directory keyed by the fingerprint of the recipe and its text, so a changed recipe (or a Python
whose pydoc text differs) trains a new model instead of reusing a stale one. The random model
(`build_tiny_gpt2`) is instant, for tests that need speed, not meaning.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import fsync_dir
from .lock import store_lock

CORPUS = Path(__file__).resolve().parents[2] / "data" / "tiny_corpus.txt"
EOS = "<|endoftext|>"
SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders decompose activations "
    "into features. A store holds chunks of activations on disk and a reader maps them into "
    "memory. Every model has layers, heads, neurons and a residual stream. "
    "One two three four five six seven eight nine ten. "
)


@dataclass(frozen=True)
class Recipe:
    """Everything that determines the trained model's bytes, with the text, the torch version and the CPU type."""

    n_layer: int = 2
    d_model: int = 64
    n_head: int = 4
    n_ctx: int = 64
    """Training context (and the model's n_positions): at least the sweep's data.context_length."""
    vocab_size: int = 512
    """Byte-level BPE trained on the same text, EOS (also BOS) included."""
    steps: int = 1000
    batch_size: int = 32
    """Contexts per step; each is BOS + n_ctx - 1 tokens from a random offset in the token stream."""
    lr: float = 3e-3
    warmup_steps: int = 100
    min_lr_fraction: float = 0.1
    """Cosine decay from lr to lr * min_lr_fraction over the steps after warmup."""
    weight_decay: float = 0.01
    heldout_corpus_fraction: float = 0.5
    """The first lines of data/tiny_corpus.txt held out of training (what model=tiny harvests and evaluates on)."""
    seed: int = 0


# -- text and tokenizer ----------------------------------------------------------------------------


def training_text(recipe: Recipe) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): pydoc topics and the corpus's later lines; its first lines."""
    from pydoc_data.topics import topics

    corpus = [line for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]
    n_heldout = round(len(corpus) * recipe.heldout_corpus_fraction)
    return [topics[name] for name in sorted(topics)] + corpus[n_heldout:], corpus[:n_heldout]


def fingerprint(recipe: Recipe, trained: bool) -> str:
    """Hash of what makes the model: this module's code and, trained, the recipe and its text (which differs
    across Python releases); random, build_tiny_gpt2's defaults. Any edit here builds a new model."""
    digest = hashlib.sha256(Path(__file__).read_bytes())
    if not trained:
        digest.update(json.dumps({"kind": "random", "defaults": build_tiny_gpt2.__defaults__}).encode())
        return digest.hexdigest()[:16]
    digest.update(json.dumps({"kind": "trained", **asdict(recipe)}, sort_keys=True).encode())
    for document in training_text(recipe)[0]:
        digest.update(document.encode("utf-8") + b"\0")
    return digest.hexdigest()[:16]


def train_tokenizer(documents: list[str], vocab_size: int):
    """A byte-level BPE (every byte encodes) with one special token, EOS, also used as BOS, UNK and PAD."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    bpe.train_from_iterator(documents, trainer=trainer)
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token=EOS, eos_token=EOS, unk_token=EOS, pad_token=EOS)


def _gpt2(tokenizer, n_layer: int, d_model: int, n_head: int, n_ctx: int):
    """A freshly initialised GPT-2 (from the global torch RNG) without dropout: the tiny models never need it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        n_layer=n_layer,
        n_embd=d_model,
        n_head=n_head,
        n_positions=n_ctx,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(config)


# -- the random model --------------------------------------------------------------------------------


def build_tiny_gpt2(
    directory: str | Path,
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 2,
    n_ctx: int = 64,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random GPT-2 (config, weights, tokenizer trained on SAMPLE_TEXT) to `directory`; return it."""
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer = train_tokenizer([SAMPLE_TEXT] * 4, vocab_size)
    tokenizer.save_pretrained(directory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        _gpt2(tokenizer, n_layer, d_model, n_head, n_ctx).save_pretrained(directory)
    return directory


# -- the trained model -------------------------------------------------------------------------------


def _token_stream(tokenizer, documents: list[str]):
    """All documents' tokens, each followed by EOS, as one 1-D tensor."""
    import torch

    ids = []
    for document in tokenizer(documents, add_special_tokens=False)["input_ids"]:
        ids.extend(document)
        ids.append(tokenizer.eos_token_id)
    return torch.tensor(ids, dtype=torch.long)


def _contexts(stream, starts, n_ctx: int, bos: int):
    """[len(starts), n_ctx] contexts: BOS, then n_ctx - 1 tokens from each start (the harvest's layout)."""
    import torch

    body = stream[starts[:, None] + torch.arange(n_ctx - 1)]
    return torch.cat([torch.full((len(starts), 1), bos), body], dim=1)


def _next_token_ce(model, tokens):
    """Mean CE (nats) of predicting tokens[:, 1:] from the logits at the positions before them."""
    import torch.nn.functional as F

    logits = model(input_ids=tokens).logits[:, :-1]  # [batch, n_ctx - 1, vocab]
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))


def _lr(recipe: Recipe, step: int) -> float:
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    return recipe.lr * (
        recipe.min_lr_fraction + (1 - recipe.min_lr_fraction) * 0.5 * (1 + math.cos(math.pi * progress))
    )


def heldout_ce(model, tokenizer, documents: list[str], n_ctx: int) -> float:
    """Mean next-token CE (nats) over consecutive BOS-led contexts of the held-out documents."""
    import torch

    stream = _token_stream(tokenizer, documents)
    starts = torch.arange(0, len(stream) - n_ctx, n_ctx - 1)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in torch.split(starts, 64):
            tokens = _contexts(stream, batch, n_ctx, tokenizer.bos_token_id)
            loss = _next_token_ce(model, tokens)
            total, count = total + float(loss) * len(batch), count + len(batch)
    return total / count


def train_tiny_gpt2(directory: str | Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train a GPT-2 by `recipe` on CPU and write it (config, weights, tokenizer, training.json) to `directory`.

    Deterministic: the init, the data order (a seeded generator) and the text are fixed, and the
    model trains on CPU in one thread. Returns training.json's content.
    """
    import torch

    directory = Path(directory)
    train_docs, heldout_docs = training_text(recipe)
    tokenizer = train_tokenizer(train_docs, recipe.vocab_size)
    stream = _token_stream(tokenizer, train_docs)
    threads = torch.get_num_threads()
    # One thread: 1000 steps took 88 s on one core of a loaded 2-core box, and 989 s with two threads on
    # the same box (OpenMP threads spin when cores are oversubscribed). With one thread the bytes also
    # do not depend on the machine's core count (one and two threads give different bytes).
    torch.set_num_threads(1)
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(recipe.seed)
            model = _gpt2(tokenizer, recipe.n_layer, recipe.d_model, recipe.n_head, recipe.n_ctx)
        order = torch.Generator().manual_seed(recipe.seed)
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=recipe.lr, betas=(0.9, 0.95), weight_decay=recipe.weight_decay
        )
        model.train()
        log_every = max(1, recipe.steps // 10)
        for step in range(recipe.steps):
            for group in optimizer.param_groups:
                group["lr"] = _lr(recipe, step)
            starts = torch.randint(0, len(stream) - recipe.n_ctx, (recipe.batch_size,), generator=order)
            tokens = _contexts(stream, starts, recipe.n_ctx, tokenizer.bos_token_id)
            loss = _next_token_ce(model, tokens)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if progress and ((step + 1) % log_every == 0 or step == 0):
                elapsed = time.perf_counter() - start
                print(
                    f"tiny GPT-2: step {step + 1}/{recipe.steps}, loss {loss.item():.3f}, {elapsed:.0f}s, "
                    f"about {elapsed / (step + 1) * (recipe.steps - step - 1):.0f}s left",
                    file=sys.stderr,
                    flush=True,
                )
        model.eval()
        seconds = time.perf_counter() - start
        record = {
            "recipe": asdict(recipe),
            "fingerprint": fingerprint(recipe, trained=True),
            "train_seconds": round(seconds, 1),
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "train_tokens": len(stream),
            "final_train_loss": round(loss.item(), 4),
            "heldout_ce": round(heldout_ce(model, tokenizer, heldout_docs, recipe.n_ctx), 4),
            "ln_vocab": round(math.log(len(tokenizer)), 4),
        }
    finally:
        torch.set_num_threads(threads)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(directory)
    model.save_pretrained(directory)
    (directory / "training.json").write_text(json.dumps(record, indent=1) + "\n")
    if progress:
        print(
            f"tiny GPT-2: trained in {seconds:.0f}s; held-out CE {record['heldout_ce']:.3f} nats "
            f"(ln vocab = {record['ln_vocab']:.2f})",
            file=sys.stderr,
            flush=True,
        )
    return record


# -- the cache ---------------------------------------------------------------------------------------


def ensure_tiny_gpt2(root: str | Path, trained: bool = True, recipe: Recipe = Recipe(), progress: bool = True) -> Path:
    """The directory `root/trained-<fingerprint>` (or `root/random-<fingerprint>`) holding the tiny model, built on
    first use.

    A model directory appears only by an atomic rename of a finished build, so its existence
    means it is complete. Concurrent first users (multirun jobs, array tasks) take the store
    lock on it: one builds, the others wait and then find it. A build killed midway leaves only
    a temp directory, which the next builder removes.
    """
    kind = "trained" if trained else "random"
    root = Path(root)
    directory = root / f"{kind}-{fingerprint(recipe, trained)}"
    if directory.is_dir():
        return directory
    with store_lock(directory):
        if directory.is_dir():  # another job built it while this one waited
            return directory
        for stale in root.glob(f".{directory.name}.tmp-*"):  # builds that were killed; the lock says none is running
            shutil.rmtree(stale, ignore_errors=True)
        temp = root / f".{directory.name}.tmp-{socket.gethostname()}-{os.getpid()}"
        if trained:
            if progress:
                print(
                    f"tiny GPT-2: training on first use ({recipe.steps} steps on one CPU thread, a minute or two); "
                    f"later runs reuse {directory}",
                    file=sys.stderr,
                    flush=True,
                )
            train_tiny_gpt2(temp, recipe, progress)
        else:
            build_tiny_gpt2(temp)
        _publish(temp, directory)
    return directory


def _publish(temp: Path, directory: Path) -> None:
    """Make the finished build durable, then rename it into place: the name never holds half a model."""
    for path in temp.rglob("*"):
        if path.is_file():
            with open(path, "rb") as f:
                os.fsync(f.fileno())
    fsync_dir(temp)
    os.rename(temp, directory)
    fsync_dir(directory.parent)
