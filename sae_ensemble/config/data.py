"""Where activations come from: a store's settings, synthetic ground truth or a language model's harvest."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_ensemble.config.choices import StoreDtype, TinyModel, Verify


@dataclass
class StoreConfig:
    """Where a store lives and how it is written and checked: what both data sources share."""

    store: str | None = None
    """Use this existing store directory as is (skips synthesis and harvesting)."""
    verify: Verify = Verify.once
    """Before training, check the store beyond chunk sizes: once = sha256 and finiteness of every row,
    recorded in its manifest and skipped later while the chunk files are unchanged; checksum = every
    time; size = sizes and headers only (the worker still skips any batch holding nan or inf)."""
    store_root: str = "stores"
    """Cache directory of content-addressed stores (relative to where you launch)."""
    rows_per_chunk: int = 65536
    """Rows per chunk file."""
    heldout_rows: int = 8192
    """Rows kept out of training, for evaluation (LM stores: not part of the cache key, so a changed
    value reuses a cached store's split; use another store_root)."""
    dtype: StoreDtype = StoreDtype.float32
    """Stored dtype (batches are always float32)."""


@dataclass
class SyntheticData(StoreConfig):
    """Ground-truth toy data (the seeds' setup): unit-norm features, a few active per row."""

    source = "synthetic"  # not a field: the group (data=synthetic) chooses the class
    d_in: int = 256
    """Activation width."""
    n_features: int = 512
    """Number of ground-truth features."""
    n_active: float = 5.0
    """Mean number of active features per row."""
    feature_prob_decay: float = 0.99
    """Feature i fires with probability proportional to decay^i."""
    n_rows: int = 300_000
    """Rows to generate (training + held out); the default is ~2.6 epochs of 3000 steps x 256 rows."""
    correlated: bool = False
    """Correlate feature activations."""
    noise_std: float = 0.0
    """Standard deviation of added Gaussian noise."""
    d_out: int = 0
    """Paired mode (transcoders' ground truth) when > 0: rows [x | y], y of this width = the same active features
    read through a second dictionary (+ x @ skip.T); every member is then a transcoder from x to y."""
    skip_std: float = 0.0
    """Paired mode: entries of the true linear skip [d_out, d_in] ~ N(0, skip_std^2); 0 = none. A skip is only
    identifiable through the noise (noise_std > 0)."""
    seed: int = 0
    """Seed of the features and rows."""


@dataclass
class LMData(StoreConfig):
    """Activations harvested from a language model (model=...) at `hook`, or at every one of `hooks`, cached by
    content (one store per hook)."""

    source = "lm"
    hooks: list[str] = field(default_factory=list)
    """Several TransformerLens hook names, harvested in one pass of the model into sibling stores that share the
    token order; the inner grid trains on each (member ids then start with the hook). Empty: the one hook of
    the top-level `hook` (which an outer multirun sweeps)."""
    hooks_out: list[str] = field(default_factory=list)
    """Transcoders: one output hook per input hook (data.hooks, or the one `hook`), aligned with them. Each pair
    is harvested in the same pass into one paired store of rows [input | output], and its members encode the
    input hook and reconstruct the output hook (e.g. blocks.0.ln2.hook_normalized -> blocks.0.hook_mlp_out, an
    MLP's input and output). Empty: SAEs, each reconstructing its own hook."""
    dataset: str = "NeelNanda/pile-10k"
    """Hugging Face dataset name (streamed) or a local .txt/.jsonl file or directory."""
    split: str = "train"
    """Dataset split."""
    dataset_config: str | None = None
    """Dataset configuration name."""
    text_field: str = "text"
    """Text field of dataset records."""
    context_length: int = 128
    """Tokens per context."""
    n_tokens: int = 2_000_000
    """Rows (token positions) to harvest."""
    drop_bos: bool = True
    """Skip the BOS position of every context."""
    harvest_batch_size: int = 16
    """Contexts per forward pass while harvesting."""


@dataclass
class ModelConfig:
    """The language model (LM data only)."""

    name: str = "gpt2"
    """Hugging Face model name or local directory, as TransformerBridge.boot_transformers takes it."""
    revision: str | None = None
    """Model revision (HF branch, tag or commit)."""
    build_tiny: TinyModel | None = None
    """trained, random or null. Set: `name` is a cache directory and the sweep uses the tiny local GPT-2
    built under it on first use (`name/<kind>-<recipe fingerprint>`): trained (model=tiny: a few CPU
    minutes once, then reused; see activations/tiny_model.py) or random (instant; for fast tests).
    null: `name` is the model itself."""
