"""LoRA-SB / LoRA-XS configuration.

Paper: *Initialization using Update Approximation is a Silver Bullet for Extremely Efficient Low-Rank Fine-Tuning*
(LoRA-SB, Ponkshe et al., https://arxiv.org/abs/2411.19557), official code https://github.com/RaghavSinghal10/lora-sb;
architecture and SVD initialisation from *LoRA-XS: Low-Rank Adaptation with Extremely Small Number of Parameters*
(https://arxiv.org/abs/2405.17604), official code https://github.com/MohammadrezaBanaei/LoRA-XS.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar, Optional

from .._shared.base import ExtConfig, bad_value

INIT_ALIASES = {"svd": "svd", "xs": "svd", "gradient": "gradient", "sb": "gradient"}
FACTOR_DTYPES = ("float32", "bfloat16")


@dataclass
class LoraSBConfig(ExtConfig):
    """Configuration of a LoRA-XS-architecture adapter ``y = W x + s·B R A x`` where A (r×in) and B (out×r) are frozen
    and only the r×r matrix R trains; ``s = lora_alpha / r``.

    Two initialisations (paper https://arxiv.org/abs/2411.19557, code https://github.com/RaghavSinghal10/lora-sb;
    LoRA-XS https://arxiv.org/abs/2405.17604, code https://github.com/MohammadrezaBanaei/LoRA-XS):

    * ``init="svd"`` (LoRA-XS): at layer creation, truncated SVD of the base weight ``W = U S Vᵀ``: ``B = U_r``,
      ``A = S_r V_rᵀ`` (so ``B·A`` is the best rank-r approximation of W) and ``R ~ N(0, r_init_std²)``, i.e. the
      start is the base model up to a 1e-5-sized perturbation (exactly the base when ``r_init_std=0``).
    * ``init="gradient"`` (LoRA-SB): ``peft_ext.init.lora_sb_init(model, dataloader, lr=...)`` estimates the full-weight
      gradient ``G`` on ``num_samples`` examples, forms the first full-fine-tuning update ``Δ = -lr_eff·sign(G)`` and
      sets ``B, R, A`` from the rank-r SVD of Δ (``R = diag(S)``), so the start is ``W + s·[Δ]_r`` (= one optimizer
      step of the full model, projected on the best rank-r subspace, when ``lora_alpha = r``). Until
      ``lora_sb_init`` runs, the layer is a valid placeholder adapter: seeded random orthonormal A and B with
      ``R = 0`` (exactly the base output, and no SVD of W is spent, which also keeps loading saved adapters cheap);
      training it in that state warns.

    Differences from the official code, as options: the official code casts U, S, V to bfloat16
    (``factor_dtype="bfloat16"`` reproduces that rounding; default float32); its randomized SVD draws from the global
    RNG (here a local generator seeded from ``seed`` and the module name, never the global RNG); the paper does not
    compensate W, so the gradient init changes the model's output (``compensate=True`` starts from the base output
    instead — see that field); the randomized SVD oversamples by ``svd_oversample`` (10, like LoRA-XS's scikit-learn
    call; LoRA-SB's ``torch.svd_lowrank(q=r)`` has none, ``svd_oversample=0``) — on the flat spectrum of a sign matrix,
    q = r lands ~50% (relative Frobenius distance) away from the true top-r factorisation, q = r + 10 about 1%.

    A and B are persistent buffers saved with the adapter. Loading a saved ``init='svd'`` adapter first recomputes the
    SVD of every targeted W (then overwritten by the saved factors): fine for small models, a one-off cost on large
    ones; an ``init='gradient'`` adapter loads without any SVD. Libraries that clone an adapter by copying its
    parameters only (TRL's reference adapter) miss the data-driven A, B: see
    ``peft_ext.init.lora_sb.copy_lora_sb_factors``.
    """

    method_name: ClassVar[str] = "lora_sb"

    r: int = field(default=8, metadata={"help": "Rank r: A is r×in, B is out×r and the trainable R is r×r."})
    lora_alpha: Optional[float] = field(
        default=None,
        metadata={
            "help": "Scale numerator α, s = α/r. None means α = r (s = 1), the LoRA-SB setting; LoRA-XS used α = 16."
        },
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the adapter input, in [0, 1)."})
    init: str = field(
        default="gradient",
        metadata={
            "help": "'gradient' (LoRA-SB): A, B, R from the SVD of the estimated first update, set by "
            "peft_ext.init.lora_sb_init (a zero-R placeholder until then). 'svd' (LoRA-XS): A, B from the truncated "
            "SVD of W at creation, R ~ N(0, r_init_std²). The aliases 'sb' and 'xs' are accepted."
        },
    )
    svd_niter: Optional[int] = field(
        default=10,
        metadata={
            "help": "Power iterations of the randomized SVD (official: 10). None computes the exact SVD "
            "(torch.linalg.svd; slower on large layers)."
        },
    )
    svd_oversample: int = field(
        default=10,
        metadata={
            "help": "Extra random test vectors of the randomized SVD (q = r + svd_oversample, as scikit-learn's "
            "TruncatedSVD used by LoRA-XS; torch.svd_lowrank used by LoRA-SB has none). 0 or more."
        },
    )
    factor_dtype: str = field(
        default="float32",
        metadata={
            "help": "Precision the SVD factors (A, B and the initial R) are rounded to: 'float32' (default) or "
            "'bfloat16' (the official LoRA-SB code casts U, S, V to bfloat16). They are stored in the adapter's dtype."
        },
    )
    compensate: bool = field(
        default=False,
        metadata={
            "help": "False (paper): the adapter starts at W + s·B R₀ A. True: the initial R₀ is saved and the adapter "
            "computes s·B (R - R₀) A, which equals subtracting s·B R₀ A from W (the start is the base output and "
            "disable_adapter() gives the initialised model's output) without modifying the base weights."
        },
    )
    seed: int = field(
        default=42,
        metadata={
            "help": "Seed of the randomized SVD, the initial R and the placeholder factors; each layer derives its "
            "own generator from it and its module name (the global RNG is never used). Official: 42."
        },
    )
    r_init_std: float = field(
        default=1e-5,
        metadata={
            "help": "Standard deviation of the initial R with init='svd' (LoRA-XS: 1e-5). 0 gives R = 0, i.e. exactly "
            "the base output at the start."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        self.check_positive_int("r")
        if self.lora_alpha is not None:
            alpha = self.lora_alpha
            if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0 < alpha < math.inf:
                raise bad_value(self, "lora_alpha", alpha, "None or a finite number > 0")
        self.check_probability("lora_dropout")
        key = self.init.lower() if isinstance(self.init, str) else self.init
        if key not in INIT_ALIASES:
            raise bad_value(self, "init", self.init, "'svd' (LoRA-XS) or 'gradient' (LoRA-SB); aliases 'xs', 'sb'")
        self.init = INIT_ALIASES[key]
        if self.svd_niter is not None and (
            isinstance(self.svd_niter, bool) or not isinstance(self.svd_niter, int) or self.svd_niter < 0
        ):
            raise bad_value(self, "svd_niter", self.svd_niter, "an integer >= 0, or None for the exact SVD")
        if isinstance(self.svd_oversample, bool) or not isinstance(self.svd_oversample, int) or self.svd_oversample < 0:
            raise bad_value(self, "svd_oversample", self.svd_oversample, "an integer >= 0")
        if self.factor_dtype not in FACTOR_DTYPES:
            raise bad_value(self, "factor_dtype", self.factor_dtype, f"one of {list(FACTOR_DTYPES)}")
        self.check_bool("compensate")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**31:
            raise bad_value(self, "seed", self.seed, "an integer in [0, 2**31)")
        self.check_finite("r_init_std", strict=False)

    def starts_at_identity(self) -> bool:
        """Whether a fresh adapter of this config leaves the base output exactly unchanged: with ``compensate``, with
        the ``gradient`` placeholder (R = 0 until ``lora_sb_init`` runs), or with ``svd`` and ``r_init_std=0``. Used by
        recipes that need a fresh adapter to be an identity (mrDPO's per-round reinit)."""
        return self.compensate or self.init == "gradient" or self.r_init_std == 0

    @property
    def scaling(self) -> float:
        """``s = lora_alpha / r`` (1 when ``lora_alpha`` is None)."""
        return (self.lora_alpha if self.lora_alpha is not None else self.r) / self.r
