"""RandLoRA with the official repository's scaling, on top of upstream ``peft.RandLoraConfig``.

Paper: *RandLoRA: Full-rank parameter-efficient fine-tuning of large models* — https://arxiv.org/abs/2502.00987.
Official code: https://github.com/PaulAlbert31/RandLoRA (a PEFT fork, ``peft/src/peft/tuners/randlora/``).
Upstream: ``peft.tuners.randlora`` (``RandLoraConfig``), which this module wraps and never copies.

Both compute ``ΔW = s · Σ_{j=1}^{n} B_j diag(λ_{:,j}) A diag(γ_j)`` with ``n = ⌈min(d_in, d_out)/r⌉`` shared frozen
random bases per layer. They differ in the scale ``s``:

* official: ``s = α / (r·√n)`` with ``α = 2r`` by default (README example ``randlora_alpha=2*rank``), so
  ``s = 2/√n``;
* upstream PEFT: ``s = α / r`` with ``α = 640 = 20r`` by default, so ``s = 20``. At width 4096 and ``r = 32``
  (``n = 128``) upstream's update is ≈113× larger, and the paper's learning rates do not carry over.

Because ``n`` differs from layer to layer (e.g. the narrow k/v projections of grouped-query attention), no single
``randlora_alpha`` reproduces the official scale. :func:`randlora_preset` with ``paper_scaling=True`` therefore
returns a :class:`RandLoraPaperConfig` (a ``RandLoraConfig`` whose ``paper_scaling`` field survives
``save_pretrained``), and each RandLoRA layer's ``scaling[adapter]`` is set to ``α/(r·√n)`` after injection:

* by :func:`post_injection_paper_scaling`, the tuner hook ``peft_ext.patches`` runs after every ``inject_adapter``
  (so ``get_peft_model``, ``add_adapter``, ``load_adapter`` and ``PeftModel.from_pretrained`` all get the paper
  scale; PEFT's config table loads a saved config as this class only when it says ``"paper_scaling": true``);
* or by hand with :func:`apply_paper_scaling` (public PEFT API only; idempotent), and
  :func:`randlora_from_pretrained` to reload a saved paper-scaled adapter without that hook.

Other differences between official code and upstream that this preset does **not** remove (stated so nobody
expects bit-parity with the official checkpoints): the random bases are drawn differently (official draws ``A`` at
the largest *out* width and ``B`` at the largest *in* width in fp32 with key ``int(e·π·1000) = 8539``; upstream draws
``A`` at the smallest and ``B`` at the largest width, in bf16 when available, with key 0), the buffers are named
``randbasis_A/B`` officially vs ``randlora_A/B`` upstream, and the official DoRA variant has no upstream counterpart.
Both initialise ``λ = 0`` and ``γ = 1/max(n, min_dim)`` (upstream draws ``λ`` from a normal only when
``init_weights=False``).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any, Optional

from peft import PeftConfig, PeftModel, RandLoraConfig
from peft.tuners.randlora import RandLoraLayer

PAPER_URL = "https://arxiv.org/abs/2502.00987"
CODE_URL = "https://github.com/PaulAlbert31/RandLoRA"


@dataclass
class RandLoraPaperConfig(RandLoraConfig):
    """``RandLoraConfig`` plus a ``paper_scaling`` marker that selects the official RandLoRA scale ``α/(r·√n)``.

    Paper: https://arxiv.org/abs/2502.00987; official code: https://github.com/PaulAlbert31/RandLoRA.
    ``peft_type`` stays ``RANDLORA`` and every other field means what it means upstream. With
    ``paper_scaling=False`` this config behaves exactly like ``RandLoraConfig``. ``peft_ext.patches`` loads a saved
    RandLoRA config through this class when the file says ``"paper_scaling": true`` (so the marker survives
    ``PeftModel.from_pretrained``) and as plain ``RandLoraConfig`` otherwise. A process without peft-ext ignores the
    unknown ``paper_scaling`` key with PEFT's "Unexpected keyword arguments" warning and falls back to upstream's
    ``α/r``.
    """

    paper_scaling: bool = field(
        default=False,
        metadata={
            "help": "True: each layer's scale is randlora_alpha/(r*sqrt(n)) with n = ceil(min(d_in, d_out)/r), as in "
            "the official RandLoRA code (https://github.com/PaulAlbert31/RandLoRA). False: upstream PEFT's "
            "randlora_alpha/r."
        },
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.paper_scaling, bool):
            raise ValueError(
                f"{type(self).__name__}.paper_scaling must be True or False; got {self.paper_scaling!r}."
            )

    def to_dict(self) -> dict:
        """As upstream; ``paper_scaling`` is written only when True, so an upstream-scaled adapter saved through this
        class stays a plain ``RandLoraConfig`` file for processes without peft-ext."""
        values = super().to_dict()
        if not self.paper_scaling:
            values.pop("paper_scaling", None)
        return values


def _check_positive_int(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{owner}.{name} must be an integer >= 1; got {value!r}.")


def randlora_preset(paper_scaling: bool = True, **kwargs: Any) -> RandLoraConfig:
    """A RandLoRA config (https://arxiv.org/abs/2502.00987) with the official scale by default.

    Official code: https://github.com/PaulAlbert31/RandLoRA. ``paper_scaling=True`` returns a
    :class:`RandLoraPaperConfig` whose layers are scaled by ``α/(r·√n)`` after injection, with ``randlora_alpha``
    defaulting to ``2·r`` as in the official README (``s = 2/√n``). ``paper_scaling=False`` returns a plain
    upstream ``RandLoraConfig(**kwargs)`` (upstream defaults: ``r = 32``, ``randlora_alpha = 640``, ``s = α/r``).
    Every other keyword is a ``RandLoraConfig`` field. The bases are upstream's (see the module docstring for how
    they differ from the official ones).
    """
    if not isinstance(paper_scaling, bool):
        raise ValueError(f"randlora_preset.paper_scaling must be True or False; got {paper_scaling!r}.")
    allowed = {f.name for f in fields(RandLoraConfig) if f.init}
    unknown = sorted(set(kwargs) - allowed)
    if unknown:
        raise ValueError(
            f"randlora_preset got unknown argument(s) {unknown}; allowed: paper_scaling and the RandLoraConfig "
            f"fields {sorted(allowed)}."
        )
    if not paper_scaling:
        return RandLoraConfig(**kwargs)
    r = kwargs.get("r", RandLoraConfig.r)
    _check_positive_int("randlora_preset", "r", r)
    kwargs.setdefault("randlora_alpha", 2 * r)
    alpha = kwargs["randlora_alpha"]
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise ValueError(f"randlora_preset.randlora_alpha must be a number > 0; got {alpha!r}.")
    return RandLoraPaperConfig(paper_scaling=True, **kwargs)


def num_bases(layer: RandLoraLayer, adapter_name: str) -> int:
    """``n = ⌈min(d_in, d_out)/r⌉``: how many random bases RandLoRA (https://arxiv.org/abs/2502.00987; official code
    https://github.com/PaulAlbert31/RandLoRA) sums in ``layer`` for ``adapter_name``."""
    return math.ceil(min(layer.in_features, layer.out_features) / layer.r[adapter_name])


def paper_scale(config: RandLoraConfig, layer: RandLoraLayer, adapter_name: str) -> float:
    """The official RandLoRA scale of one layer, ``randlora_alpha / (r · √n)`` (https://arxiv.org/abs/2502.00987;
    official code https://github.com/PaulAlbert31/RandLoRA, ``RandLoraLayer.update_layer``)."""
    return config.randlora_alpha / layer.r[adapter_name] / math.sqrt(num_bases(layer, adapter_name))


def _set_layer_scales(model, adapter_name: str, config: RandLoraConfig) -> dict[str, float]:
    scales = {}
    for name, module in model.named_modules():
        if isinstance(module, RandLoraLayer) and adapter_name in module.scaling:
            if adapter_name in getattr(module, "merged_adapters", []):
                raise ValueError(
                    f"RandLoRA adapter {adapter_name!r} is merged into {name!r}; unmerge it before changing its "
                    "scale (the merged weights were computed with the old one)."
                )
            module.scaling[adapter_name] = paper_scale(config, module, adapter_name)
            scales[name] = module.scaling[adapter_name]
    return scales


def post_injection_paper_scaling(tuner, adapter_name: str) -> None:
    """Tuner hook: after ``RandLoraModel.inject_adapter``, give the layers of ``adapter_name`` the official scale
    when its config says ``paper_scaling`` (https://arxiv.org/abs/2502.00987;
    https://github.com/PaulAlbert31/RandLoRA). A no-op for plain upstream RandLoRA configs.

    ``peft_ext.patches`` calls this from its wrapper of ``peft.tuners.randlora.RandLoraModel.inject_adapter``, which
    runs for ``get_peft_model``, ``add_adapter``, ``load_adapter`` and ``PeftModel.from_pretrained``.
    """
    config = tuner.peft_config.get(adapter_name)
    if config is not None and getattr(config, "paper_scaling", False):
        _set_layer_scales(tuner.model, adapter_name, config)


def _as_paper_config(config: RandLoraConfig) -> RandLoraPaperConfig:
    if isinstance(config, RandLoraPaperConfig) and config.paper_scaling:
        return config
    values = {f.name: getattr(config, f.name) for f in fields(config) if f.init and f.name != "paper_scaling"}
    return RandLoraPaperConfig(**values, paper_scaling=True)


def apply_paper_scaling(model, adapter_name: Optional[str] = None) -> dict[str, float]:
    """Give RandLoRA layers the official scale ``α/(r·√n)`` (https://arxiv.org/abs/2502.00987; official code
    https://github.com/PaulAlbert31/RandLoRA) and mark the adapter's config ``paper_scaling=True`` so that
    ``save_pretrained`` records it.

    ``model`` is a ``PeftModel`` (or ``RandLoraModel``) with RandLoRA adapters; ``adapter_name=None`` converts every
    RandLoRA adapter. Uses public PEFT API only (``peft_config`` and each layer's ``scaling`` dict) and is idempotent:
    the scale is recomputed from the config, never divided again. Returns ``{layer name: scale}``. Refuses merged
    adapters (their weights were merged with the old scale).
    """
    configs = getattr(model, "peft_config", None)
    if not isinstance(configs, dict):
        raise ValueError(f"apply_paper_scaling needs a PeftModel with RandLoRA adapters; got {type(model).__name__}.")
    names = [n for n, c in configs.items() if isinstance(c, RandLoraConfig)]
    if adapter_name is not None:
        if adapter_name not in names:
            raise ValueError(
                f"apply_paper_scaling: {adapter_name!r} is not a RandLoRA adapter of this model; RandLoRA adapters: "
                f"{names}."
            )
        names = [adapter_name]
    if not names:
        raise ValueError("apply_paper_scaling: the model has no RandLoRA adapter.")
    scales: dict[str, float] = {}
    for name in names:
        config = _as_paper_config(configs[name])
        layer_scales = _set_layer_scales(model, name, config)
        configs[name] = config  # the same dict object as base_model.peft_config / model.peft_config
        scales.update({f"{layer}[{name}]" if len(names) > 1 else layer: s for layer, s in layer_scales.items()})
    return scales


def randlora_from_pretrained(model, model_id: str, adapter_name: str = "default", **kwargs: Any) -> PeftModel:
    """``PeftModel.from_pretrained`` for a saved RandLoRA adapter that keeps the official scale
    (https://arxiv.org/abs/2502.00987; https://github.com/PaulAlbert31/RandLoRA) even without the registry hook.

    Reads ``adapter_config.json`` itself (PEFT would drop the ``paper_scaling`` key of a plain ``RandLoraConfig``),
    builds the config as :class:`RandLoraPaperConfig`, loads with PEFT and, when the saved config says
    ``paper_scaling``, applies :func:`apply_paper_scaling`. ``kwargs`` go to ``PeftModel.from_pretrained``.
    """
    subfolder = kwargs.get("subfolder")
    path = os.path.join(model_id, subfolder) if subfolder else model_id
    config_file = os.path.join(path, "adapter_config.json")
    if not os.path.isfile(config_file):
        raise ValueError(f"randlora_from_pretrained: no adapter_config.json in {path!r}.")
    values = PeftConfig.from_json_file(config_file)
    if str(values.get("peft_type")) != "RANDLORA":
        raise ValueError(
            f"randlora_from_pretrained: {path!r} holds a {values.get('peft_type')!r} adapter, not RANDLORA."
        )
    allowed = {f.name for f in fields(RandLoraPaperConfig) if f.init}
    config = RandLoraPaperConfig(**{k: v for k, v in values.items() if k in allowed})
    peft_model = PeftModel.from_pretrained(model, model_id, adapter_name=adapter_name, config=config, **kwargs)
    if config.paper_scaling:
        apply_paper_scaling(peft_model, adapter_name)
    return peft_model
