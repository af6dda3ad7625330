"""CMLoRA: *Cached Multi-LoRA Composition for Multi-Concept Image Generation* (Zou et al., ICLR 2025, arXiv 2502.04923).

Official code: https://github.com/Yqcca/CMLoRA (``LoRA_Cache/pipelines/stable_diffusion/pipeline_offline.py``,
``LoRA_Cache/models/unets/unet_2d_condition.py``, ``fft_analysis.ipynb``). Their code forks diffusers and loads the
adapters into one pipeline; ours runs through the unmodified ``StableDiffusionPipeline.__call__`` on one UNet with N
PEFT adapters, replacing the UNet's ``forward`` for the call (as LoRA Composite does in ``compose.py``).

Pieces, each a flat function so it can be checked against the official formulas:

- ``frequency_metric``: channel mean -> 2-D FFT (shifted) magnitude -> radial average over integer radii -> / max ->
  mean over radii >= ``min_radius`` (80 in the official online pipeline).
- ``order_by_frequency``: adapters whose metric is >= ``threshold`` form the high-frequency set H (the official
  offline pipeline hard-codes H = character, clothing, style, object; L = background), the rest L; order = H + L.
- ``dominant_weights``: ``c = N - 0.5``, ``w_non = N / (c + N - 1)``, ``w_dom = c * w_non`` (they average to 1).
- ``refresh_steps``: the cache refresh schedule of ``cache_interval`` c (c=0: every 2 steps up to 37.5% of the steps,
  every 3 up to 87.5%, every 2 after; c=1: every step; c>1: every c steps).
- ``cmlora_schedule``: per step, whether the caches refresh, which adapter recomputes its deep features, which adapter
  is dominant (it rotates through H at each refresh; after ``shift_step`` the rotation shifts by one so the first L
  adapter takes part), and the per-adapter weights.
- ``cmlora``: the generation. At every step each adapter runs; an adapter with cached deep features reuses them and
  recomputes only the shallow blocks (``conv_in``, the outer ``cache_depth`` down and up blocks, ``conv_out``); at a
  refresh step only the dominant adapter's cache is cleared, so only it recomputes the deep blocks. The weighted
  predictions are averaged before classifier-free guidance.

Official quirks, reproduced with ``faithful_quirks=True`` (default False = the paper's behaviour):

1. ``dom_lora_coeff`` is decremented by ``0.5**k`` at each refresh, but the weights were computed once before the loop,
   so the decay has no effect: the official weights are constant. Constant weights are also the paper's equation,
   so both modes use them; ``decay_dominant=True`` applies the decay the dead code suggests (recomputing the weights at
   each refresh; for N=2 the dominant weight turns negative at the third refresh).
2. After step 120 (hard-coded for 220 steps) the refresh writes ``prv_features_list[1:][idx] = None`` -- into a
   copy -- so no cache is ever refreshed again; the dominant index still rotates. ``faithful_quirks=True`` refreshes
   nothing after ``shift_step`` and takes ``shift_step = 120`` literally; the paper mode refreshes the shifted
   dominant adapter and scales the shift to ``120 * num_steps // 220``.
3. (also found) The UNet reuses cached features only when ``cache_interval > 1`` (``quick_replicate=cache_interval >
   1``), so the default non-uniform schedule c=0 and c=1 never reuse anything in the official run; with
   ``faithful_quirks=True`` c <= 1 computes every adapter fully at every step.

The official online pipeline's metric (``relative_log_amplitude[80:]`` on 64x64 latents, whose largest integer radius
is 45) is the mean of an empty slice, NaN, so its ``m >= 0.68`` test is always false; ``frequency_metric`` raises
instead when ``min_radius`` exceeds the largest radius.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np
import torch

from .compose import (CompositionResult, _like, _sample_of, check_adapters, count_unet_evals, patched_forward,
                      restore_adapters)

OFFICIAL_STEPS = 220
OFFICIAL_SHIFT_STEP = 120


@dataclass
class CMLoRAConfig:
    """Settings of a CMLoRA generation (defaults: the official offline run's, behaviour of the paper)."""

    cache_interval: int = field(default=0, metadata={
        "help": "Cache refresh interval c: 0 = the paper's non-uniform schedule (every 2 steps to 37.5%, every 3 to "
                "87.5%, every 2 after), 1 = every step, c > 1 = every c steps."})
    cache_depth: int = field(default=1, metadata={
        "help": "How many outer UNet levels are 'shallow' and always recomputed (conv_in, down_blocks[:d], "
                "up_blocks[-d:], conv_out); the rest (down_blocks[d:], mid_block, up_blocks[:-d]) is the deep part "
                "that a cached adapter reuses. 1 <= d < number of down blocks."})
    use_cache: bool = field(default=True, metadata={
        "help": "Reuse cached deep features between refreshes; False computes every adapter fully at every step."})
    dominant: bool = field(default=True, metadata={
        "help": "Weight the dominant adapter by w_dom and the others by w_non; False gives every adapter weight 1 "
                "(with use_cache=False this is LoRA Composite)."})
    shift_step: Optional[int] = field(default=None, metadata={
        "help": "After this step the dominant rotation shifts by one so the first low-frequency adapter takes part "
                "(only when there is one). None = 120 * num_steps // 220, or 120 with faithful_quirks."})
    decay_dominant: bool = field(default=False, metadata={
        "help": "Apply the official dead code's decay of the dominant coefficient (c -= 0.5**k at the k-th refresh, "
                "weights recomputed). Off in the official run and the paper; see quirk 1."})
    faithful_quirks: bool = field(default=False, metadata={
        "help": "Reproduce the official pipeline's bugs: no cache refresh after shift_step (copy assignment), "
                "shift_step=120 literally, and no feature reuse at all when cache_interval <= 1."})

    def __post_init__(self):
        for name in ("cache_interval", "cache_depth"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"CMLoRAConfig.{name}: expected an integer, got {value!r}")
        if self.cache_interval < 0:
            raise ValueError(f"CMLoRAConfig.cache_interval: expected 0 (non-uniform), 1 or c > 1, got "
                             f"{self.cache_interval}")
        if self.cache_depth < 1:
            raise ValueError(f"CMLoRAConfig.cache_depth: expected >= 1, got {self.cache_depth}")
        if self.shift_step is not None and (isinstance(self.shift_step, bool) or not isinstance(self.shift_step, int)
                                            or self.shift_step < 0):
            raise ValueError(f"CMLoRAConfig.shift_step: expected None or an integer >= 0, got {self.shift_step!r}")

    def resolved_shift_step(self, num_steps: int) -> int:
        if self.shift_step is not None:
            return self.shift_step
        if self.faithful_quirks:
            return OFFICIAL_SHIFT_STEP
        return OFFICIAL_SHIFT_STEP * num_steps // OFFICIAL_STEPS


def frequency_metric(x, min_radius: int = 80, log: bool = False) -> float:
    """The CMLoRA frequency metric of an image or latent ``x`` ((C, H, W) -> channel mean, or (H, W)).

    |fftshift(fft2(x))| (``log=True``: log(|.| + 1e-8), the notebook's variant) averaged over integer radii from the
    centre, divided by its maximum, averaged over radii >= ``min_radius``. High values: much high-frequency content."""
    a = x.detach().cpu().double().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float64)
    if a.ndim == 3:
        a = a.mean(axis=0)
    if a.ndim != 2:
        raise ValueError(f"x: expected an image or latent of shape (C, H, W) or (H, W), got shape {tuple(a.shape)}")
    spectrum = np.abs(np.fft.fftshift(np.fft.fft2(a)))
    if log:
        spectrum = np.log(spectrum + 1e-8)
    rows, cols = spectrum.shape
    y, xx = np.meshgrid(np.arange(rows) - rows // 2, np.arange(cols) - cols // 2, indexing="ij")
    radius = np.sqrt(xx ** 2 + y ** 2).astype(int).ravel()
    if min_radius > radius.max() or min_radius < 0:
        raise ValueError(f"min_radius: {min_radius} is outside 0..{radius.max()} (the largest integer radius of a "
                         f"{rows}x{cols} input); the official 80 suits 512x512 images")
    profile = np.bincount(radius, weights=spectrum.ravel()) / np.bincount(radius)
    profile = profile / profile.max()
    return float(profile[min_radius:].mean())


def lora_frequency_metrics(pipe, adapters: Sequence[str], min_radius: int, log: bool = False,
                           **pipe_kwargs) -> dict:
    """Generate with each adapter alone (``output_type='latent'``) and return ``{adapter: frequency_metric}`` of the
    first sample's final latent, as the official online pipeline measures its latents. A ``generator`` is rewound
    before each adapter, so all start from the same noise."""
    names = check_adapters(pipe, adapters)
    generator = pipe_kwargs.get("generator")
    state = generator.get_state() if isinstance(generator, torch.Generator) else None
    metrics = {}
    with restore_adapters(pipe):
        for name in names:
            if state is not None:  # every adapter starts from the same noise
                generator.set_state(state)
            pipe.unet.set_adapters([name])
            latents = pipe(**{**pipe_kwargs, "output_type": "latent"}).images
            metrics[name] = frequency_metric(latents[0], min_radius=min_radius, log=log)
    return metrics


def order_by_frequency(metrics: dict, threshold: float = 0.68):
    """Split ``{adapter: metric}`` into (high, low): metric >= ``threshold`` is high frequency; each list sorted by
    metric, highest first. The CMLoRA order is ``high + low``."""
    if not metrics:
        raise ValueError("metrics: expected at least one adapter")
    ranked = sorted(metrics, key=lambda name: -metrics[name])
    high = [name for name in ranked if metrics[name] >= threshold]
    low = [name for name in ranked if metrics[name] < threshold]
    return high, low


def dominant_weights(n: int, coeff: Optional[float] = None):
    """(w_dom, w_non) for ``n`` adapters: ``c = n - 0.5`` unless given,``w_non = n / (c + n - 1)``, ``w_dom = c w_non``.
    Since ``w_dom + (n-1)*w_non = n``, the weighted predictions still average to one prediction."""
    if n < 1:
        raise ValueError(f"n: expected at least one adapter, got {n}")
    c = n - 0.5 if coeff is None else coeff
    w_non = n / (c + n - 1)
    return c * w_non, w_non


def refresh_steps(num_steps: int, cache_interval: int) -> list:
    """The official cache refresh steps (uniform sampling; the quad-centre sampler is not used by the official runs)."""
    if num_steps < 1:
        raise ValueError(f"num_steps: expected >= 1, got {num_steps}")
    if cache_interval == 0:
        a, b = int(0.375 * num_steps), int(0.875 * num_steps)
        return sorted(list(range(0, a, 2)) + list(range(a, b, 3)) + list(range(b, num_steps, 2)))
    if cache_interval == 1:
        return list(range(num_steps))
    return list(range(0, num_steps, cache_interval))


@dataclass
class StepPlan:
    """What CMLoRA does at one denoising step (indices into the order ``high + low``)."""

    step: int
    refresh: bool
    refreshed: Optional[int]
    dominant: int
    weights: tuple


def cmlora_schedule(num_steps: int, n_high: int, n_low: int, config: CMLoRAConfig = None) -> list:
    """Per-step plan of the official offline pipeline (or the paper's, with ``faithful_quirks=False``).

    At a refresh step the adapter ``indicator % |H|`` (``+1`` after ``shift_step`` when there are low-frequency
    adapters) has its cache cleared and becomes dominant; ``indicator`` then counts up. With no high-frequency adapter
    the rotation runs over all adapters (the official code divides by zero there)."""
    config = config or CMLoRAConfig()
    if n_high < 0 or n_low < 0 or n_high + n_low < 1:
        raise ValueError(f"n_high, n_low: expected counts >= 0 with at least one adapter, got {n_high}, {n_low}")
    if n_high == 0:
        n_high, n_low = n_low, 0
    n = n_high + n_low
    shift = config.resolved_shift_step(num_steps)
    refresh = set(refresh_steps(num_steps, config.cache_interval))
    coeff = n - 0.5
    w_dom, w_non = dominant_weights(n)
    indicator, plans = 0, []
    for i in range(num_steps):
        shifted = n_low > 0 and i > shift
        refreshed = None
        if i in refresh:
            coeff -= 0.5 ** indicator
            if config.decay_dominant:
                w_dom, w_non = dominant_weights(n, coeff)
            if not shifted:
                refreshed = indicator % n_high
            elif not config.faithful_quirks:
                refreshed = indicator % n_high + 1
            indicator += 1
        dom = (indicator - 1) % n_high + (1 if shifted else 0)
        weights = tuple((w_dom if k == dom else w_non) if config.dominant else 1.0 for k in range(n))
        plans.append(StepPlan(i, i in refresh, refreshed, dom, weights))
    return plans


def deep_modules(unet, depth: int = 1) -> list:
    """The UNet's deep part for a cache depth: ``down_blocks[depth:]``, ``mid_block``, ``up_blocks[:-depth]``."""
    if not 1 <= depth < len(unet.down_blocks):
        raise ValueError(f"cache_depth: expected 1..{len(unet.down_blocks) - 1} for a UNet with "
                         f"{len(unet.down_blocks)} down blocks, got {depth}")
    mods = list(unet.down_blocks[depth:])
    if unet.mid_block is not None:
        mods.append(unet.mid_block)
    return mods + list(unet.up_blocks[: len(unet.up_blocks) - depth])


class DeepFeatureCache:
    """Wraps the deep blocks' ``forward``: in ``record`` mode they run and their outputs are stored, in ``reuse`` mode
    they return the stored outputs without running (the shallow blocks around them run as usual). ``deep_evals``
    counts the passes that ran the deep blocks."""

    def __init__(self, unet, depth: int = 1):
        self.modules = deep_modules(unet, depth)
        self.mode = "plain"
        self.store: Optional[list] = None
        self.deep_evals = 0

    def _wrap(self, index: int, original):
        def forward(*args, **kwargs):
            if self.mode == "reuse":
                return self.store[index]
            if index == 0:
                self.deep_evals += 1
            out = original(*args, **kwargs)
            if self.mode == "record":
                self.store[index] = out
            return out

        return forward

    @contextlib.contextmanager
    def installed(self):
        with contextlib.ExitStack() as stack:
            for index, module in enumerate(self.modules):
                stack.enter_context(patched_forward(module, lambda original, i=index: self._wrap(i, original)))
            yield self

    def run(self, call, cached: Optional[list], record: bool):
        """Run ``call()`` reusing ``cached`` features (when given) or recording new ones; returns (output, features)."""
        if cached is not None:
            self.mode, self.store = "reuse", cached
            try:
                return call(), cached
            finally:
                self.mode, self.store = "plain", None
        self.mode, self.store = ("record", [None] * len(self.modules)) if record else ("plain", None)
        try:
            return call(), self.store
        finally:
            self.mode, self.store = "plain", None


def cmlora(pipe, high: Sequence[str], low: Sequence[str] = (), config: Optional[CMLoRAConfig] = None,
           **pipe_kwargs) -> CompositionResult:
    """Generate with CMLoRA from high-frequency adapters ``high`` and low-frequency adapters ``low`` (the order is
    ``high + low``; use ``order_by_frequency`` to get them from measured metrics). ``pipe_kwargs`` go to the pipeline
    (``num_inference_steps`` is required; a scheduler with one UNet pass per step)."""
    config = config or CMLoRAConfig()
    high, low = list(high), list(low)
    order = check_adapters(pipe, high + low, "high + low")
    if "num_inference_steps" not in pipe_kwargs:
        raise ValueError("num_inference_steps: required (the cache schedule depends on it)")
    if getattr(pipe.scheduler, "order", 1) != 1:
        raise ValueError(f"scheduler: CMLoRA needs one UNet pass per step (order 1), got "
                         f"{type(pipe.scheduler).__name__} of order {pipe.scheduler.order}")
    num_steps = int(pipe_kwargs["num_inference_steps"])
    plans = cmlora_schedule(num_steps, len(high), len(low), config)
    reuse = config.use_cache and not (config.faithful_quirks and config.cache_interval <= 1)
    unet = pipe.unet
    cache = DeepFeatureCache(unet, config.cache_depth)
    features: list = [None] * len(order)
    state = {"step": 0}
    dominants: list = []

    def make_forward(original):
        def forward(*args, **kwargs):
            i = state["step"]
            if i >= len(plans):
                raise RuntimeError(f"CMLoRA: the pipeline ran more UNet passes than num_inference_steps={num_steps}")
            plan = plans[i]
            if plan.refreshed is not None:
                features[plan.refreshed] = None
            dominants.append(order[plan.dominant])
            outputs, first = [], None
            for k, name in enumerate(order):
                unet.set_adapters([name])
                out, feats = cache.run(lambda: original(*args, **kwargs), features[k] if reuse else None, reuse)
                features[k] = feats if reuse else None
                first = out if first is None else first
                outputs.append(_sample_of(out) * plan.weights[k])
            state["step"] += 1
            return _like(first, torch.stack(outputs, dim=0).mean(dim=0))

        return forward

    with restore_adapters(pipe), count_unet_evals(unet) as counter, cache.installed(), \
            patched_forward(unet, make_forward):
        images = pipe(**pipe_kwargs).images
    return CompositionResult(images, counter["n"], cache.deep_evals, dominants)


# the package-level name (``peft_ext.diffusion.cmlora`` is this module), named like the other methods' entry points
cmlora_generate = cmlora
