"""Store benchmark: is training fed from disk as fast as from RAM, and does harvesting cost more than the forward?

    .venv/bin/python -m benchmarks.store                 # on the GPU when there is one, else the CPU
    .venv/bin/python -m benchmarks.store --device cpu

feed_ratio    = time of N ensemble steps fed by train_batches(store) / same steps fed from an in-memory
                tensor on the training device (random batches by index) — goal <= 1.05. On a GPU that
                tensor lives in GPU memory, so the ratio is what the host-side feed (gather, pinned
                copy, transfer) adds to a step.
harvest_ratio = time of harvest() (tokenise, forward with hooks, background chunk writes, manifest)
                / bare forward passes of the same model over the same token batches — goal <= 1.15.
harvest_hooks_ratio = harvesting 4 hooks (every block's hook_resid_post, one pass: data.hooks) / harvesting
                the last one alone — goal <= 1.3 (four stores written, one forward).
The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from sae_ensemble.activations import harvest as harvest_module
from sae_ensemble.activations.reader import ActivationStore
from sae_ensemble.activations.stream import train_batches
from sae_ensemble.activations.tiny_model import SAMPLE_TEXT, build_tiny_gpt2
from sae_ensemble.activations.writer import ChunkWriter

D_IN, MEMBERS, DICT, BATCH = 256, 8, 1024, 512
STEPS_PER_ROUND, ROUNDS = 4, 4
# The CPU is shared: rounds of both variants are interleaved and each ratio uses the fastest round
# of each variant (the least-disturbed measurement); totals are printed too.


def make_step(device: torch.device):
    """The ensemble's training step on MEMBERS x DICT features."""
    from sae_ensemble.ensemble import Ensemble
    from sae_ensemble.member import Member

    members = [Member("relu", D_IN, DICT, l1=1e-3 * (i + 1), seed=i) for i in range(MEMBERS)]
    ensemble = Ensemble(members, total_steps=10**6, device=device)
    return ensemble.step, "sae_ensemble.ensemble.Ensemble"


def bench_feed(root: Path, device: torch.device) -> dict:
    n_rows = BATCH * STEPS_PER_ROUND * ROUNDS * 2 + 4096  # every step of both feeds sees fresh rows
    writer = ChunkWriter(root / "feed", D_IN, "float32", 16_384, heldout_rows=4096)
    gen = torch.Generator().manual_seed(0)
    for start in range(0, n_rows, 16_384):
        writer.write(torch.randn(min(16_384, n_rows - start), D_IN, generator=gen))
    store = writer.close()
    training_rows = np.setdiff1d(np.arange(store.n_rows), store.heldout_indices())
    in_memory = store.rows(training_rows).to(device)  # [n_train, d] in RAM or GPU memory
    step, step_kind = make_step(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # GPU work is async: time it done

    from_store = train_batches(store, BATCH, seed=0, device=device)
    order = torch.randperm(store.n_train_rows, generator=gen).to(device)
    cursor = 0

    def run_store():
        for _ in range(STEPS_PER_ROUND):
            step(next(from_store)[0])
        sync()

    def run_memory():
        nonlocal cursor
        for _ in range(STEPS_PER_ROUND):
            step(in_memory[order[cursor : cursor + BATCH]])
            cursor = (cursor + BATCH) % (len(order) - BATCH)
        sync()

    run_store(), run_memory()  # warm up both paths
    store_t, memory_t = [], []
    for _ in range(ROUNDS):  # interleaved, so load from other users hits both alike
        t = time.perf_counter()
        run_store()
        store_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        run_memory()
        memory_t.append(time.perf_counter() - t)
    # the feed alone, without the step: noise-robust size of what the store adds per step
    t = time.perf_counter()
    for _ in range(50):
        next(from_store)
    sync()
    feed_only_store = (time.perf_counter() - t) / 50
    t = time.perf_counter()
    for i in range(50):
        in_memory[order[(i * BATCH) % (len(order) - BATCH) :][:BATCH]].sum()
    sync()
    feed_only_memory = (time.perf_counter() - t) / 50
    steps = STEPS_PER_ROUND * ROUNDS
    print(
        f"feed alone: store {feed_only_store * 1e3:.2f} ms/batch, in-memory index {feed_only_memory * 1e3:.2f} ms/batch"
    )
    print(f"feed: {steps} steps of {step_kind} ({MEMBERS} members x {DICT} x d={D_IN}, batch {BATCH})")
    print(f"  from store  {sum(store_t) / steps * 1e3:7.1f} ms/step   rounds {[round(t, 2) for t in store_t]}")
    print(f"  from memory {sum(memory_t) / steps * 1e3:7.1f} ms/step   rounds {[round(t, 2) for t in memory_t]}")
    return {
        "feed_ratio": min(store_t) / min(memory_t),
        "feed_ratio_total": sum(store_t) / sum(memory_t),
        "feed_ms_per_step_store": 1e3 * min(store_t) / STEPS_PER_ROUND,
        "feed_ms_per_step_memory": 1e3 * min(memory_t) / STEPS_PER_ROUND,
        "feed_step": step_kind,
        "feed_only_ms_store": 1e3 * feed_only_store,
        "feed_only_ms_memory": 1e3 * feed_only_memory,
    }


def bench_harvest(root: Path, device: torch.device) -> dict:
    n_layer, d_model, context, batch_size, n_batches = 4, 256, 128, 16, 8
    model_dir = build_tiny_gpt2(root / "model", n_layer=n_layer, d_model=d_model, n_head=4, n_ctx=context)
    sentences = [s.strip() + "." for s in SAMPLE_TEXT.split(".") if s.strip()]
    text = root / "corpus.txt"
    text.write_text(
        "\n".join(" ".join(f"{i}{j} {sentences[(i * j + j) % len(sentences)]}" for j in range(8)) for i in range(3000))
    )
    bridge = harvest_module.boot_model(str(model_dir), device=str(device))
    n_tokens = batch_size * n_batches * (context - 1)  # BOS positions are dropped
    contexts = list(harvest_module.iter_contexts(harvest_module.iter_texts(str(text)), bridge.tokenizer, context))
    batches = [torch.tensor(contexts[i * batch_size : (i + 1) * batch_size], device=device) for i in range(n_batches)]
    assert all(len(b) == batch_size for b in batches), "benchmark corpus too small"

    def bare():
        with torch.inference_mode():
            for tokens in batches:
                bridge(tokens, return_type=None)
        if device.type == "cuda":
            torch.cuda.synchronize()

    def harvest(hooks: str | list[str], tag: str):
        hooks = [hooks] if isinstance(hooks, str) else hooks
        harvest_module.harvest(
            bridge,
            {h: harvest_module.HarvestSpec(str(model_dir), h, str(text), n_tokens, context) for h in hooks},
            {h: root / f"harvest_{tag}_{h}" for h in hooks},
            device=str(device),
            batch_size=batch_size,
            rows_per_chunk=32_768,
            progress=False,
        )

    bare()  # warm up
    last_hook = f"blocks.{n_layer - 1}.hook_resid_post"  # needs the whole stack: like-for-like with bare
    mid_hook = f"blocks.{n_layer // 2 - 1}.hook_resid_post"  # harvest stops after this block
    every_hook = [f"blocks.{i}.hook_resid_post" for i in range(n_layer)]
    bare_t, harvest_t, mid_t, hooks_t = [], [], [], []
    for r in range(ROUNDS):
        t = time.perf_counter()
        bare()
        bare_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        harvest(last_hook, f"last{r}")
        harvest_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        harvest(mid_hook, f"mid{r}")
        mid_t.append(time.perf_counter() - t)
        t = time.perf_counter()
        harvest(every_hook, f"all{r}")
        hooks_t.append(time.perf_counter() - t)
    store = ActivationStore.open(root / f"harvest_last0_{last_hook}")
    print(
        f"harvest: GPT-2 {n_layer} layers d={d_model}, {n_batches} x {batch_size} contexts of {context} "
        f"({n_tokens} rows, {store.n_rows * store.d_in * 4 / 1e6:.0f} MB)"
    )
    print(f"  bare forward        {min(bare_t):6.2f} s   ({n_tokens / min(bare_t):,.0f} tok/s)")
    print(f"  harvest {last_hook:<20} {min(harvest_t):6.2f} s   ({n_tokens / min(harvest_t):,.0f} tok/s)")
    print(f"  harvest {mid_hook:<20} {min(mid_t):6.2f} s   (stops after block {n_layer // 2 - 1})")
    print(f"  harvest {len(every_hook)} hooks {'':<12} {min(hooks_t):6.2f} s   (one pass, {len(every_hook)} stores)")
    return {
        "harvest_ratio": min(harvest_t) / min(bare_t),
        "harvest_ratio_total": sum(harvest_t) / sum(bare_t),
        "harvest_ratio_mid_layer": min(mid_t) / min(bare_t),
        "harvest_hooks_ratio": min(hooks_t) / min(harvest_t),
        "harvest_tokens_per_s": n_tokens / min(harvest_t),
        "bare_tokens_per_s": n_tokens / min(bare_t),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(parser.parse_args().device)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory(prefix="bench_store_") as tmp:
        result = {**bench_feed(Path(tmp), device), **bench_harvest(Path(tmp), device)}
    result["threads"] = torch.get_num_threads()
    result["device"] = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(
        f"feed_ratio {result['feed_ratio']:.3f} (goal <= 1.05), "
        f"harvest_ratio {result['harvest_ratio']:.3f} (goal <= 1.15), "
        f"harvest_hooks_ratio {result['harvest_hooks_ratio']:.3f} (4 hooks / 1, goal <= 1.3)"
    )
    print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in result.items()}))


if __name__ == "__main__":
    main()
