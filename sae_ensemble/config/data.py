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
class Zipf:
    """Zipfian firing (sae_lens' zipfian_firing_probabilities): p_i ∝ (i+1)^-exponent, rescaled to [p_min, p_max]."""

    exponent: float = 1.0
    """Power-law exponent: higher = steeper fall from the most to the least frequent feature."""
    p_max: float = 0.3
    """Firing probability of feature 0, the most frequent."""
    p_min: float = 0.01
    """Firing probability of the last feature, the rarest."""


@dataclass
class Magnitudes:
    """Per-feature firing magnitudes (sae_lens' firing_magnitudes): an active feature i takes
    relu(mean_i + std_i * N(0, 1)), mean_i linear from mean_first to mean_last, std_i ~ |N(std_mean, std_spread^2)|."""

    mean_first: float = 1.0
    """Mean magnitude of feature 0 (the most frequent)."""
    mean_last: float = 1.0
    """Mean magnitude of the last feature (the rarest); linear in between."""
    std_mean: float = 0.0
    """Centre of the folded normal each feature's magnitude spread is drawn from (0 with std_spread 0: no spread)."""
    std_spread: float = 0.0
    """Spread of that folded normal (0: every feature's std is |std_mean|)."""


@dataclass
class Hierarchy:
    """A forest of features (sae_lens' generate_hierarchy): features 0..roots-1 are roots, their children follow
    breadth first; a child fires only when its parent fires. Features beyond the forest stay independent."""

    roots: int = 32
    """Trees in the forest."""
    branching: int = 4
    """Children of every non-leaf node."""
    depth: int = 3
    """Levels below the roots (1 = roots with leaf children)."""
    exclusive: bool = True
    """Siblings are mutually exclusive: when several would fire, one chosen uniformly at random keeps firing."""
    compensate: bool = False
    """Raise each child's own probability as sae_lens' compensate_probabilities does (/ its parent's base probability,
    x the exclusion's loss at the siblings' base probabilities); exclusive children's rates after gating still fall
    short of their Zipf or decay probability (docs/synthetic.md measures by how much)."""


@dataclass
class Correlation:
    """Low-rank Gaussian-copula correlation of firing (sae_lens' generate_random_low_rank_correlation_matrix):
    z = eps @ F.T + sqrt(1 - |F_i|^2) eta with F ~ N(0, scale^2) [n_features, rank]; feature i fires when
    z_i > Φ⁻¹(1 - p_i), so its rate stays p_i."""

    rank: int = 25
    """Rank of the correlation's factor (shared latent causes)."""
    scale: float = 0.1
    """Entries of the factor ~ N(0, scale^2): larger = stronger correlations; rank * scale^2 must stay below 0.99."""


@dataclass
class Geometry:
    """Feature directions orthogonalised until their mean max |cosine| reaches a target (Adam on the overlaps above
    0.9 x target, rows kept unit norm: sae_lens' loss on every overlap barely moves the max; structured.py)."""

    target_mean_max_cos: float = 0.15
    """Stop once the mean over features of the max |cos| to any other feature is at most this (above the
    Welch bound sqrt((N - D) / (D (N - 1))) for N features in D = d_in dimensions)."""
    max_steps: int = 1000
    """Give up (the store is not written, the error says the overlap reached) after this many steps."""
    lr: float = 0.003
    """Adam learning rate of the orthogonalisation."""


@dataclass
class World:
    """A structured synthetic world (activations/structured.py, docs/synthetic.md); every part is off (None) unless
    set, and the toy's own setting stands in for it: decay firing, U[0, 1) magnitudes, independent features,
    random unit directions."""

    zipf: Zipf | None = None
    """Zipfian firing; null: the toy's decay^i scaled to n_active."""
    magnitudes: Magnitudes | None = None
    """Per-feature magnitude mean and spread; null: U[0, 1) as the toy."""
    hierarchy: Hierarchy | None = None
    """Parent-gated, optionally mutually exclusive feature trees; null: independent features."""
    correlation: Correlation | None = None
    """Low-rank correlated firing; null: independent firing."""
    geometry: Geometry | None = None
    """Directions orthogonalised to a target overlap; null: random unit directions."""


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
    world: World | None = None
    """A structured world (hierarchy, Zipfian firing, correlations, geometry; data=synthetic_hier or
    data=synthsaebench16k); null: the toy above, unchanged. Part of the store's key only when set."""


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
