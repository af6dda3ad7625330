"""LoRA-Pro optimizer for PEFT LoRA models.

Paper: *LoRA-Pro: Are Low-Rank Adapters Properly Optimized?* (Wang et al., ICLR 2025,
https://arxiv.org/abs/2407.18242). Official code: https://github.com/mrflogs/LoRA-Pro (the method lives inside a
patched DeepSpeed, ``deepspeed/runtime/zero/stage_1_and_2.py``: ``lorapro_full_adjustment`` / ``solve_sylvester``).
This is an independent re-implementation written from the paper and ``METHODS.md`` section 5.1.

For a LoRA layer ``W = W0 + s·B·A`` (``A``: r×n, ``B``: m×r, ``s`` = PEFT scaling) with full gradient ``g`` (m×n),
the factor gradients are ``g_A = s·Bᵀg`` and ``g_B = s·g·Aᵀ``. Each step, per LoRA pair:

1. **Equivalent gradient** ``g̃ = s·B·ĝ_A + s·ĝ_B·A`` with
   ``t = 0``: ``ĝ_A = g_A``, ``ĝ_B = s⁻²·g_B·(AAᵀ+δI)⁺``;
   ``t > 0``: ``ĝ_A = s⁻²(BᵀB+δI)⁺g_A``, ``ĝ_B = s⁻²(I − B(BᵀB+δI)⁺Bᵀ)·g_B·(AAᵀ+δI)⁺``
   (for δ → 0 this is ``g̃ = P_B g + (I−P_B) g P_A``, the projection of ``g`` onto the LoRA tangent space).
2. **Full-size Adam** on ``g̃``: moments ``m, v`` of shape m×n, bias-corrected, ``u = m̂/(√v̂ + eps)``.
3. **Back to the factors**: ``g_A'' = s·Bᵀu``, ``g_B'' = s·u·Aᵀ``;
   ``t = 0``: ``grad_A = g_A''``, ``grad_B = s⁻²·g_B''·(AAᵀ)⁺``;
   ``t > 0``: solve the Sylvester equation ``(BᵀB)X + X(AAᵀ) = −s⁻²(BᵀB)⁺g_A''Aᵀ`` and set
   ``grad_A = s⁻²(BᵀB)⁺g_A'' + X·A``, ``grad_B = s⁻²(I−P_B)g_B''(AAᵀ)⁺ − B·X``.
   Then ``s·(B·grad_A + grad_B·A) = P_B u + (I−P_B) u P_A`` exactly for *any* X; the Sylvester solution is the X
   that minimises ``‖grad_A‖² + ‖grad_B‖²`` (the paper's optimal choice).
4. ``p ← p − lr·grad`` (so to first order ``ΔW = −lr·[P_B u + (I−P_B) u P_A]``).

Sylvester solver: ``BᵀB`` and ``AAᵀ`` are symmetric positive semi-definite r×r matrices, so we diagonalise both with
``torch.linalg.eigh`` (``BᵀB = UΛUᵀ``, ``AAᵀ = VMVᵀ``); in that basis the equation is element-wise,
``Y_ij = C'_ij / (λ_i + μ_j)`` with ``C' = UᵀCV`` and ``X = UYVᵀ``. This is exact (up to rounding), real-valued and
stable, unlike the general complex ``eig`` route; entries with ``λ_i + μ_j ≈ 0`` are set to 0 (minimum-norm
solution). It is computed in float64 because the matrices are only r×r.

Differences from the official code:

* Runs on a single device without DeepSpeed. (The official single-GPU script passes no DeepSpeed config, so its
  Trainer runs ``optim="sgd"`` and no LoRA-Pro at all.) Not ZeRO-3 / FSDP compatible: it needs whole A, B and their
  gradients per module.
* Pairs A and B by PEFT module (``LoraLayer.lora_A[adapter]`` / ``lora_B[adapter]``), not by parameter position.
* Reads ``s`` from ``module.scaling[adapter]`` at every step (works for rsLoRA / any alpha) instead of hard-coding 2.
* Both Adam moments are kept in fp32 (the official code keeps ``v`` in bf16), also for bf16 / fp16 LoRA weights and
  across ``load_state_dict`` (which would otherwise cast them to the parameter dtype).
* Optional decoupled weight decay ``p ← p − lr·wd·p`` on A and B (and on non-LoRA params). The paper/official code
  use wd = 0; how weight decay should interact with LoRA-Pro is UNCERTAIN, so the default is 0.
* δ in step 3: we use the unregularised pseudo-inverses ``(BᵀB)⁺``, ``(AAᵀ)⁺`` the paper writes; the official code
  reuses the regularised ``(BᵀB+δI)⁺``, ``(AAᵀ+δI)⁺`` of step 1 there. ``official_delta=True`` does the same.
* Gradient clipping: the official code takes the clip factor ``min(1, c/(‖g‖+1e-6))`` from the global norm of the raw
  A/B gradients and applies it to the *adjusted* factor updates (after Adam). ``transformers.Trainer``
  (``max_grad_norm``, default 1.0) instead clips the raw gradients before ``step()``, i.e. before the equivalent
  gradient and Adam. ``LoraProAdamW(max_grad_norm=c)`` reproduces the official order (factor from the raw norm over
  all of this optimizer's parameters; applied to the LoRA-Pro factor updates and to the AdamW group's gradients);
  set ``TrainingArguments(max_grad_norm=0)`` with it so that the Trainer does not clip first.

Limits (checked when the optimizer is built):

* ``lora_dropout > 0``: the identities ``g_A = s·Bᵀg``, ``g_B = s·g·Aᵀ`` assume the LoRA branch sees the same input as
  the base layer; dropout breaks them, so ``g̃`` is no longer the projection of the full gradient. A warning (once)
  names the first such module. The paper and official code use ``lora_dropout=0``.
* Several trainable active adapters on one layer: each pair would add its own projection of the same full update
  (ΔW counted once per adapter) and its own m×n moments, so this raises ``ValueError`` naming the layer and adapters.

Memory: two full m×n fp32 moments per LoRA pair (i.e. full fine-tuning optimizer state), stored in
``self.state[lora_A.weight]`` (``exp_avg``, ``exp_avg_sq``, ``step``). Trainable parameters that are not part of a
LoRA pair (``modules_to_save`` heads, LoRA biases, DoRA magnitudes, embedding/conv LoRA) get plain AdamW in a second
parameter group. Both groups expose ``lr`` so HF / torch LR schedulers work, and the state dict is standard.
"""

from __future__ import annotations

import math
import warnings
import torch
from torch import nn

__all__ = [
    "LoraProAdamW",
    "create_lorapro_optimizer",
    "equivalent_gradient",
    "factor_updates",
    "solve_sylvester_sym",
    "find_lora_pairs",
]


# --------------------------------------------------------------------------------------------------------------
# Linear-algebra helpers (pure functions, used by the optimizer and unit-tested directly)
# --------------------------------------------------------------------------------------------------------------


def solve_sylvester_sym(P: torch.Tensor, Q: torch.Tensor, C: torch.Tensor, tol: float = 1e-12) -> torch.Tensor:
    """Solve ``P X + X Q = C`` for symmetric PSD ``P`` (r×r) and ``Q`` (k×k) by eigen-decomposition (float64).

    With ``P = UΛUᵀ`` and ``Q = VMVᵀ``: ``X = U [ (UᵀCV)_ij / (λ_i + μ_j) ] Vᵀ``. Pairs with
    ``λ_i + μ_j <= tol·max(1, max|λ|+max|μ|)`` are set to 0 (minimum-norm solution of the singular case).

    LoRA-Pro paper: https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro.
    """
    dtype = C.dtype
    P64, Q64, C64 = P.double(), Q.double(), C.double()
    P64 = 0.5 * (P64 + P64.T)
    Q64 = 0.5 * (Q64 + Q64.T)
    lam, U = torch.linalg.eigh(P64)
    mu, V = torch.linalg.eigh(Q64)
    denom = lam[:, None] + mu[None, :]
    thresh = tol * torch.clamp(lam.abs().max() + mu.abs().max(), min=1.0)  # a tensor: no host sync
    Cp = U.T @ C64 @ V
    safe = denom.abs() > thresh
    Y = torch.where(safe, Cp / torch.where(safe, denom, torch.ones_like(denom)), torch.zeros_like(Cp))
    return (U @ Y @ V.T).to(dtype)


def _reg_inv(M: torch.Tensor, delta: float) -> torch.Tensor:
    """``(M + δI)⁺`` for a small symmetric matrix."""
    eye = torch.eye(M.shape[0], dtype=M.dtype, device=M.device)
    return torch.linalg.pinv(M + delta * eye, hermitian=True)


def equivalent_gradient(
    A: torch.Tensor, B: torch.Tensor, g_A: torch.Tensor, g_B: torch.Tensor, s: float, delta: float, first: bool
) -> torch.Tensor:
    """Step 1: the equivalent full gradient ``g̃`` (m×n) from the factor gradients.

    ``first=True`` is the paper's t=0 case, ``first=False`` the t>0 case (see module docstring).

    LoRA-Pro paper: https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro.
    """
    AAt_inv = _reg_inv(A @ A.T, delta)
    if first:
        hg_A = g_A
        hg_B = g_B @ AAt_inv / (s * s)
    else:
        BtB_inv = _reg_inv(B.T @ B, delta)
        hg_A = BtB_inv @ g_A / (s * s)
        proj_B = g_B - B @ (BtB_inv @ (B.T @ g_B))  # (I - B(BᵀB+δI)⁺Bᵀ) g_B
        hg_B = proj_B @ AAt_inv / (s * s)
    return s * (B @ hg_A) + s * (hg_B @ A)


def factor_updates(
    A: torch.Tensor, B: torch.Tensor, u: torch.Tensor, s: float, first: bool, delta: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 3: map a full-size update direction ``u`` (m×n) to ``(grad_A, grad_B)``.

    Guarantees ``s·(B·grad_A + grad_B·A) = P_B u + (I−P_B) u P_A`` for t>0 (``first=False``) and
    ``= s²·BBᵀu + u P_A`` for t=0 (which is ``u P_A`` for the usual ``B = 0`` initialisation).
    ``delta > 0`` replaces the pseudo-inverses ``(BᵀB)⁺``, ``(AAᵀ)⁺`` by ``(BᵀB+δI)⁺``, ``(AAᵀ+δI)⁺`` as the official
    code does (the Sylvester left-hand side keeps ``BᵀB``, ``AAᵀ``); the paper's form is ``delta = 0``.

    LoRA-Pro paper: https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro.
    """
    gA2 = s * (B.T @ u)  # r×n
    gB2 = s * (u @ A.T)  # m×r
    AAt = A @ A.T
    AAt_pinv = _reg_inv(AAt, delta)
    if first:
        return gA2, gB2 @ AAt_pinv / (s * s)
    BtB = B.T @ B
    BtB_pinv = _reg_inv(BtB, delta)
    rhs = -(BtB_pinv @ gA2 @ A.T) / (s * s)
    X = solve_sylvester_sym(BtB, AAt, rhs)
    grad_A = BtB_pinv @ gA2 / (s * s) + X @ A
    proj = gB2 - B @ (BtB_pinv @ (B.T @ gB2))  # (I - P_B) g_B''
    grad_B = proj @ AAt_pinv / (s * s) - B @ X
    return grad_A, grad_B


# --------------------------------------------------------------------------------------------------------------
# Pair discovery
# --------------------------------------------------------------------------------------------------------------


class _Pair:
    __slots__ = ("module", "adapter", "A", "B", "name")

    def __init__(self, module: nn.Module, adapter: str, A: nn.Parameter, B: nn.Parameter, name: str = ""):
        self.module, self.adapter, self.A, self.B, self.name = module, adapter, A, B, name

    @property
    def dropout(self) -> float:
        """The dropout probability of this adapter's branch (0 when there is none)."""
        for child_name, child in self.module.named_children():
            if "dropout" in child_name and isinstance(child, nn.ModuleDict) and self.adapter in child:
                layer = child[self.adapter]
                return float(layer.p) if isinstance(layer, nn.Dropout) else 0.0
        return 0.0

    @property
    def scaling(self) -> float:
        if hasattr(self.module, "lora_factors"):  # a peft-ext tuner layer declaring ΔW = s·B·A
            return float(self.module.lora_factors(self.adapter)[2])
        return float(self.module.scaling[self.adapter])


def find_lora_pairs(model: nn.Module) -> list[_Pair]:
    """Every trainable (lora_A.weight, lora_B.weight) pair of a PEFT LoRA model, paired by module and adapter, and
    the (A, B) pair of every peft-ext tuner layer whose ``MethodSpec`` declares ``ba_shape`` (via ``lora_factors``).

    Only plain linear LoRA is paired (2-D weights, no DoRA); other LoRA variants fall back to AdamW with a warning.
    Adapters whose weights do not require grad (inactive adapters) are skipped.

    LoRA-Pro paper: https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro.
    """
    from peft.tuners.lora import LoraLayer

    from ..registry import list_methods

    ba_layers = tuple(spec.model_cls.tuner_layer_cls for spec in list_methods() if spec.ba_shape)
    pairs: list[_Pair] = []
    for name, module in model.named_modules():
        if isinstance(module, ba_layers):
            for adapter in module.active_adapters:
                if adapter in module.r:
                    A, B, _ = module.lora_factors(adapter)
                    if A.requires_grad and B.requires_grad:
                        pairs.append(_Pair(module, adapter, A, B, name))
            continue
        if not isinstance(module, LoraLayer):
            continue
        active = module.active_adapters
        for adapter in module.lora_A.keys():
            if adapter not in module.lora_B or adapter not in active:
                continue
            A = getattr(module.lora_A[adapter], "weight", None)
            B = getattr(module.lora_B[adapter], "weight", None)
            if A is None or B is None or not (A.requires_grad and B.requires_grad):
                continue
            use_dora = bool(getattr(module, "use_dora", {}).get(adapter, False))
            if A.dim() != 2 or B.dim() != 2 or use_dora or A.shape[0] != B.shape[1]:
                warnings.warn(
                    f"LoRA-Pro: {name} (adapter {adapter!r}) is not a plain linear LoRA pair; using AdamW for it.",
                    stacklevel=2,
                )
                continue
            pairs.append(_Pair(module, adapter, A, B, name))
    return pairs


# --------------------------------------------------------------------------------------------------------------
# Optimizer
# --------------------------------------------------------------------------------------------------------------


class LoraProAdamW(torch.optim.Optimizer):
    """LoRA-Pro (Wang et al., ICLR 2025) with Adam, for a PEFT LoRA model, on one device.

    Args:
        model: a PEFT model (or any module) containing ``peft.tuners.lora.LoraLayer`` modules.
        lr: learning rate (shared by both parameter groups; each group exposes ``lr`` for schedulers).
        betas, eps: Adam hyper-parameters (paper: (0.9, 0.999), 1e-8).
        delta: δ regulariser of the equivalent-gradient inverses (paper: 1e-8).
        weight_decay: decoupled weight decay (UNCERTAIN in the paper, default 0).
        max_grad_norm: clip as the official code does: factor ``min(1, c/(‖g‖+1e-6))`` from the global norm of the
            raw gradients of this optimizer's parameters, applied to the adjusted LoRA-Pro updates (and to the AdamW
            group's gradients). ``None`` (default): no clipping here. Use with ``TrainingArguments(max_grad_norm=0)``.
        official_delta: use ``(·+δI)⁺`` in step 3 too, as the official code does (default False: the paper's ``(·)⁺``).

    Raises ``ValueError`` when a layer has several trainable active adapters; warns once when a paired adapter has
    ``lora_dropout > 0`` (see the module docstring).

    Parameter group 0 (``"lorapro": True``) holds ``[A_1, B_1, A_2, B_2, ...]``; group 1 (``"lorapro": False``) holds
    all other trainable parameters and is updated with plain AdamW. The full-size moments of a pair live in
    ``self.state[A_i]``; ``self.state[B_i]`` is empty. See the module docstring for the algorithm and the
    differences from the official code.

    LoRA-Pro paper: https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro.
    """

    def __init__(
        self,
        model: nn.Module,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        delta: float = 1e-8,
        weight_decay: float = 0.0,
        max_grad_norm: float | None = None,
        official_delta: bool = False,
    ):
        if lr < 0:
            raise ValueError(f"LoraProAdamW: lr must be >= 0; got {lr!r}")
        if len(betas) != 2 or not (0.0 <= betas[0] < 1.0 and 0.0 <= betas[1] < 1.0):
            raise ValueError(f"LoraProAdamW: betas must be two numbers in [0, 1); got {betas!r}")
        for arg, value in (("eps", eps), ("delta", delta), ("weight_decay", weight_decay)):
            if value < 0:
                raise ValueError(f"LoraProAdamW: {arg} must be >= 0; got {value!r}")
        if max_grad_norm is not None and not max_grad_norm > 0:
            raise ValueError(f"LoraProAdamW: max_grad_norm must be > 0 or None; got {max_grad_norm!r}")
        self._pairs = find_lora_pairs(model)
        if not self._pairs:
            raise ValueError("LoraProAdamW: no trainable PEFT LoRA (lora_A/lora_B) pair found in the model")
        by_module: dict[int, list[_Pair]] = {}
        for pair in self._pairs:
            by_module.setdefault(id(pair.module), []).append(pair)
        for group in by_module.values():
            if len(group) > 1:
                raise ValueError(
                    f"LoraProAdamW: layer {group[0].name} has {len(group)} trainable active adapters "
                    f"{[p.adapter for p in group]}; each would add its own projection of the same full update (ΔW "
                    "counted once per adapter) and its own full-size moments. Train one adapter at a time "
                    "(model.set_adapter(name)) or freeze the others."
                )
        with_dropout = [pair for pair in self._pairs if pair.dropout > 0]
        if with_dropout:
            first = with_dropout[0]
            warnings.warn(
                f"LoRA-Pro: {len(with_dropout)} LoRA pair(s) use dropout (first: {first.name}, adapter "
                f"{first.adapter!r}, lora_dropout={first.dropout:g}); the equivalent gradient assumes g_A = s·Bᵀg and "
                "g_B = s·g·Aᵀ, which dropout breaks. The paper and official code use lora_dropout=0.",
                stacklevel=2,
            )
        paired = {id(p) for pair in self._pairs for p in (pair.A, pair.B)}
        lora_params = [p for pair in self._pairs for p in (pair.A, pair.B)]
        seen: set[int] = set()
        other: list[nn.Parameter] = []
        for p in model.parameters():
            if p.requires_grad and id(p) not in paired and id(p) not in seen:
                seen.add(id(p))
                other.append(p)
        groups = [{"params": lora_params, "lorapro": True}]
        if other:
            groups.append({"params": other, "lorapro": False})
        defaults = dict(lr=lr, betas=tuple(betas), eps=eps, delta=delta, weight_decay=weight_decay)
        super().__init__(groups, defaults)
        self.max_grad_norm = max_grad_norm
        self.official_delta = bool(official_delta)

    @property
    def pairs(self) -> list[_Pair]:
        return list(self._pairs)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        coef = self._clip_coef() if self.max_grad_norm is not None else None
        for group in self.param_groups:
            if group.get("lorapro", False):
                self._step_lorapro(group, coef)
            else:
                self._step_adamw(group, coef)
        return loss

    def _clip_coef(self) -> torch.Tensor | None:
        """The official clip factor ``min(1, c/(‖g‖+1e-6))`` from the raw gradients (a tensor: no host sync)."""
        norms = [torch.linalg.vector_norm(p.grad.float()) for g in self.param_groups for p in g["params"]
                 if p.grad is not None]
        if not norms:
            return None
        total = torch.linalg.vector_norm(torch.stack([n.to(norms[0].device) for n in norms]))
        return torch.clamp(self.max_grad_norm / (total + 1e-6), max=1.0)

    def load_state_dict(self, state_dict: dict) -> None:
        """``torch.optim.Optimizer.load_state_dict``, but the Adam moments stay float32.

        Torch casts every floating state tensor to its parameter's dtype; for bf16 / fp16 LoRA weights that would
        round the full-size moments to half precision (and break the fp32 update). The saved moments are put back
        in float32 instead.
        """
        index_to_param = {}
        for saved, group in zip(state_dict["param_groups"], self.param_groups):
            index_to_param.update(zip(saved["params"], group["params"]))
        moments = {
            index: {k: v for k, v in st.items() if k in ("exp_avg", "exp_avg_sq") and torch.is_tensor(v)}
            for index, st in state_dict["state"].items()
        }
        super().load_state_dict(state_dict)
        for index, values in moments.items():
            p = index_to_param.get(index)
            for key, value in values.items():
                if p is not None:
                    self.state[p][key] = value.to(device=p.device, dtype=torch.float32, copy=True)

    def _step_lorapro(self, group: dict, coef: torch.Tensor | None = None) -> None:
        params = group["params"]
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, delta, wd = group["eps"], group["delta"], group["weight_decay"]
        delta_update = delta if self.official_delta else 0.0
        for i in range(0, len(params), 2):
            pA, pB = params[i], params[i + 1]
            pair = self._pairs[i // 2]
            if pA is not pair.A or pB is not pair.B:  # guards against a mangled param group
                raise RuntimeError("LoraProAdamW: parameter group 0 no longer matches the LoRA pairs")
            if pA.grad is None and pB.grad is None:
                continue
            A = pA.detach().float()
            B = pB.detach().float()
            g_A = pA.grad.float() if pA.grad is not None else torch.zeros_like(A)
            g_B = pB.grad.float() if pB.grad is not None else torch.zeros_like(B)
            s = pair.scaling

            state = self.state[pA]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)  # on the CPU, like torch's Adam: reading it is no device sync
                state["exp_avg"] = torch.zeros(B.shape[0], A.shape[1], dtype=torch.float32, device=A.device)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            t = int(state["step"]) + 1  # 1-based index of this step
            first = t == 1

            # 1. equivalent gradient
            g_tilde = equivalent_gradient(A, B, g_A, g_B, s, delta, first)
            # 2. full-size Adam
            state["step"] += 1
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g_tilde, 1 - beta1)
            v.mul_(beta2).addcmul_(g_tilde, g_tilde, value=1 - beta2)
            m_hat = m / (1 - beta1**t)
            v_hat = v / (1 - beta2**t)
            u = m_hat / (v_hat.sqrt() + eps)
            # 3. back to the factors (uses the pre-update A, B)
            grad_A, grad_B = factor_updates(A, B, u, s, first, delta_update)
            if coef is not None:  # the official clipping: on the adjusted updates
                grad_A = grad_A * coef.to(grad_A.device)
                grad_B = grad_B * coef.to(grad_B.device)
            # 4. p <- p - lr * grad (+ optional decoupled weight decay)
            if wd != 0:
                pA.mul_(1 - lr * wd)
                pB.mul_(1 - lr * wd)
            pA.add_(grad_A.to(pA.dtype), alpha=-lr)
            pB.add_(grad_B.to(pB.dtype), alpha=-lr)

    def _step_adamw(self, group: dict, coef: torch.Tensor | None = None) -> None:
        lr, (beta1, beta2) = group["lr"], group["betas"]
        eps, wd = group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            g = p.grad.float()
            if coef is not None:
                g = g * coef.to(g.device)
            state = self.state[p]
            if len(state) == 0:
                state["step"] = torch.tensor(0.0)
                state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(state["exp_avg"])
            state["step"] += 1
            t = int(state["step"])
            m, v = state["exp_avg"], state["exp_avg_sq"]
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            bc1 = 1 - beta1**t
            bc2 = 1 - beta2**t
            denom = (v.sqrt() / math.sqrt(bc2)).add_(eps)
            if wd != 0:
                p.mul_(1 - lr * wd)
            p.add_((m / denom).to(p.dtype), alpha=-lr / bc1)


def create_lorapro_optimizer(model: nn.Module, lr: float, **kwargs) -> LoraProAdamW:
    """Build a :class:`LoraProAdamW` for ``model``; use as ``Trainer(optimizers=(opt, None))`` (or with a scheduler).

    ``kwargs`` are forwarded (``betas``, ``eps``, ``delta``, ``weight_decay``, ``max_grad_norm``, ``official_delta``).

    LoRA-Pro paper: https://arxiv.org/abs/2407.18242; official code https://github.com/mrflogs/LoRA-Pro.
    """
    return LoraProAdamW(model, lr=lr, **kwargs)
