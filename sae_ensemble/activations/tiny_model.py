"""A tiny, randomly initialised GPT-2 saved to a local directory, for offline tests and benchmarks.

No downloads: the tokenizer is a byte-level BPE trained here on a fixed English snippet, so any
text tokenises. `TransformerBridge.boot_transformers(directory)` boots the result.
"""

from __future__ import annotations

from pathlib import Path

SAMPLE_TEXT = (
    "The quick brown fox jumps over the lazy dog. Sparse autoencoders decompose activations "
    "into features. A store holds chunks of activations on disk and a reader maps them into "
    "memory. Every model has layers, heads, neurons and a residual stream. "
    "One two three four five six seven eight nine ten. "
)


def build_tiny_gpt2(
    directory: str | Path,
    n_layer: int = 2,
    d_model: int = 64,
    n_head: int = 2,
    n_ctx: int = 64,
    vocab_size: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random GPT-2 (config, weights, tokenizer) to `directory`; return the directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte encodes
        show_progress=False,
    )
    bpe.train_from_iterator([SAMPLE_TEXT] * 4, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|endoftext|>",
    )
    tokenizer.save_pretrained(directory)

    torch.manual_seed(seed)
    config = GPT2Config(
        n_layer=n_layer,
        n_embd=d_model,
        n_head=n_head,
        n_positions=n_ctx,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    GPT2LMHeadModel(config).save_pretrained(directory)
    return directory
