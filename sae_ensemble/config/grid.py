"""The inner grid's axes: every combination becomes one member (sae_ensemble.grid expands them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from sae_ensemble.config.choices import Variant


@dataclass
class Grid:
    """The inner-grid axes; every combination becomes one member (grid.members)."""

    variants: list[Variant] = field(default_factory=lambda: [Variant.relu])
    """SAE variants (docs/architectures.md); each family trains in ensembles of its own."""
    dict_sizes: list[int] = field(default_factory=list)
    """Absolute dictionary sizes; combined with dict_ratios (sizes = these + ratio * d_in)."""
    dict_ratios: list[float] = field(default_factory=list)
    """Dictionary sizes as multiples of d_in."""
    l1: list[float] = field(default_factory=lambda: [1e-3])
    """L1 coefficients (relu, tied and gated members); unused when target_l0 is set."""
    target_l0: list[float] = field(default_factory=list)
    """Target L0s (active features per row): when set, this axis replaces l1 and k. relu and tied
    members steer their coefficient toward each target (starting from l1_start; steering.py); topk
    members take k = round(target). Ids read `relu-d512-L0_8-...`."""
    l1_start: float = 1e-3
    """Starting sparsity coefficient of target-L0 members (the controller moves it from there)."""
    k: list[int] = field(default_factory=lambda: [32])
    """Active features per row (topk members; batchtopk and matryoshka: on average over a batch)."""
    l0_coefficient: list[float] = field(default_factory=lambda: [1e-4])
    """L0-penalty coefficients (jumprelu members; our MSE is a mean over d_in, so SAELens' value / d_in)."""
    bias_decay: list[float] = field(default_factory=lambda: [0.0])
    """Encoder-bias decay coefficients."""
    lr: list[float] = field(default_factory=lambda: [1e-3])
    """Peak learning rates."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """Initialisation seeds."""
    skip_connection: list[bool] = field(default_factory=lambda: [False])
    """Transcoders (a paired store, data.d_out > 0): with and/or without a learned linear skip path."""
    use_b_dec: bool = True
    """Learn a decoder bias (pre-encoder centring)."""
    max_grad_norm: float = 0.0
    """Clip each member's gradient to this L2 norm every step; 0 = never (SAELens' and dictionary_learning's
    always-on clipping at 1.0 of their d_in-times-larger loss is 1 / d_in here)."""
    encoder_init_norm: float = 1.0
    """Norm of each encoder row at init, along its unit decoder row (SAELens' decoder_init_norm; sparsify's
    nn.Linear init gives about 0.58, dictionary_learning's ReLU SAE 0.1). Short trainings depend on it."""
    learned_decoder_norm: bool = False
    """topk, batchtopk and matryoshka SAEs: decoder rows keep a learned norm that scales each feature's pre-activation
    (SAELens' TopK and BatchTopK training: rescale_acts_by_decoder_norm over an unconstrained W_dec); saved SAEs fold
    it into the encoder."""
    lr_warmup_steps: int = 0
    """Linear learning-rate warmup steps."""
    lr_decay_steps: int = 0
    """Final steps of linear learning-rate decay to 0."""
    l1_warmup_steps: int = 0
    """Linear warmup steps of the sparsity coefficient (l1; jumprelu: l0_coefficient)."""
    threshold: float = 0.01
    """jumprelu: initial threshold of every feature."""
    bandwidth: float = 0.05
    """jumprelu: width of the rectangle kernel of the threshold's straight-through estimators."""
    topk_threshold_lr: float = 0.01
    """batchtopk, matryoshka: rate of the running estimate of the inference threshold."""
    matryoshka_fractions: list[float] = field(default_factory=lambda: [0.0625, 0.25])
    """matryoshka: nested prefix sizes as fractions of each dict size (rounded; the whole dict is the last level)."""
    auxk_dead_tokens: int = 0
    """topk, batchtopk, matryoshka: AuxK (Gao et al. 2024) on features that fired in none of this many most recent
    training rows (Gao et al.: 10M tokens); 0 = no AuxK."""
    auxk_coefficient: float = 1 / 32
    """Coefficient of the AuxK loss (Gao et al.'s 1/32)."""
    k_aux: int = 0
    """Dead features AuxK reconstructs the residual with; 0 = d_in // 2 (SAELens; Gao et al. used 512)."""
    resample_every: int = 0
    """relu, tied: resample dead features every this many steps (dictionary_learning's resample_steps); 0 = never."""

    def sizes(self, d_in: int) -> list[int]:
        """The dictionary sizes for activations of width d_in, sorted, without repeats."""
        return sorted(set(list(self.dict_sizes) + [int(round(r * d_in)) for r in self.dict_ratios]))
