"""Multi-token prediction with gated LoRA and speculative decoding (*Your LLM Knows the Future: Uncovering Its
Multi-Token Prediction Potential*, https://arxiv.org/abs/2507.11851; no official code, unofficial
https://github.com/siihwanpark/MTP-GLoRA, read but not copied).

The model: ``k`` ``<mask>`` tokens are appended after a regular token; a ``gated_lora`` adapter is on only at the
mask positions (``gate=`` per call), so every regular position is the untouched base model. Mask ``d`` (0-based)
after regular token ``i`` predicts token ``i + d + 2`` (token ``i + 1`` is the base model's own next-token
prediction). A 2-layer sampler head turns each mask's last hidden state plus the embedding of the previous token
into a draft token: ``[Linear(2H→H), SiLU, RMSNorm] → [Linear(H→H), SiLU, RMSNorm]`` with a residual around the
second block, logits through the frozen ``lm_head``.

Layout: regular tokens first, then the mask blocks, with explicit position ids (mask ``d`` after token ``i`` sits at
position ``pos(i) + d + 1``) and an explicit 4-D additive attention mask (regular tokens attend earlier regular
tokens only; masks attend the regular tokens up to their anchor and the earlier masks of their own block). Because
regular tokens never see masks and the gate is off there, their keys/values do not depend on anything trained:
training computes them once without gradient (a KV cache) and runs only the masks with autograd.

The ``<mask>`` embedding is one trainable row (``MTPHead.mask_embedding``) substituted into ``inputs_embeds`` at mask
positions, instead of a row appended to the (tied, on SmolLM2) embedding matrix: the vocabulary and ``lm_head`` stay
the base model's, and nothing else of the embedding can train. Trained: the gated LoRA, the sampler, that row.

Losses (``MTPConfig``), on the model's own greedy generations:

* ``mtp_loss_weight``: cross-entropy of ``lm_head(z_mask)`` against the future token (the paper's base CE on the MTP
  outputs);
* ``sampler_loss_weight``: cross-entropy of the sampler's logits, conditioned on the true previous token (teacher
  forcing: on self-generated data the true token is what verification accepts);
* ``consistency_loss_weight``: the paper's latent consistency loss, ``‖z_mask − sg(z_regular)‖²`` (mean over the
  hidden size) against the last hidden state of the regular position that predicts the same token.

``soft_targets=True`` uses the base model's next-token distribution at that regular position as the target of both
CE terms (what MTP-GLoRA does). Where MTP-GLoRA differs: it has only the sampler's soft CE (no base-head CE on the
masks, no consistency term), conditions the sampler on its own previous argmax instead of the true token, and places
``D`` masks after every token inside the sequence (FlexAttention block mask) rather than after a cache.

Decoding (``mtp_generate``): linear verification puts the masks after the last draft only (new drafts exist when
every draft was accepted, else the next forward drafts from scratch); quadratic puts ``k`` masks after every
regular token so new drafts exist whatever prefix is accepted. Drafts are verified by the base model's greedy
prediction in the same forward; the output is the base model's greedy output.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

HEAD_FILE = "mtp_head.safetensors"
CONFIG_FILE = "mtp_config.json"
VERIFICATIONS = ("linear", "quadratic")


@dataclass
class MTPConfig:
    """Settings of multi-token prediction training and decoding (https://arxiv.org/abs/2507.11851). UNCERTAIN in the
    paper (no official code): k, the loss weights and the training length; the defaults are a CPU-sized choice."""

    num_masks: int = field(
        default=4,
        metadata={
            "help": "k: <mask> tokens appended after a regular token (drafts per "
            "forward); MTP-GLoRA's D=4, the paper's k is UNCERTAIN (8?)."
        },
    )
    use_sampler: bool = field(
        default=True,
        metadata={
            "help": "Draft with the 2-layer sampler head (conditioned on the "
            "previous token); False: argmax of lm_head at each mask."
        },
    )
    mtp_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the CE of lm_head at the masks."})
    sampler_loss_weight: float = field(default=1.0, metadata={"help": "Weight of the sampler head's CE."})
    consistency_loss_weight: float = field(
        default=1.0, metadata={"help": "Weight of the latent consistency loss ||z_mask - sg(z_regular)||^2."}
    )
    soft_targets: bool = field(
        default=False,
        metadata={
            "help": "CE against the base model's distribution at the "
            "matching regular position (MTP-GLoRA) instead of "
            "the generated token."
        },
    )
    steps: int = field(default=100, metadata={"help": "Optimizer steps."})
    batch_size: int = field(default=2, metadata={"help": "Sequences per step."})
    learning_rate: float = field(default=1e-3, metadata={"help": "AdamW learning rate (adapter, sampler, mask row)."})
    warmup_ratio: float = field(
        default=0.1,
        metadata={
            "help": "Share of the steps with a linear learning-rate warm-up "
            "from 0 (the sampler's dense layers jump otherwise)."
        },
    )
    blocks_per_sequence: Optional[int] = field(
        default=None,
        metadata={
            "help": "Mask blocks trained per sequence per step, drawn at random from the generated "
            "positions (a cheaper unbiased estimate); None: every position."
        },
    )
    train_prompts: int = field(
        default=32, metadata={"help": "Prompts whose greedy continuations are the training data."}
    )
    gen_tokens: int = field(default=64, metadata={"help": "Greedy tokens generated per training prompt."})
    eval_prompts: int = field(default=4, metadata={"help": "Held-out prompts for the decoding measurement."})
    eval_tokens: int = field(default=64, metadata={"help": "max_new_tokens of the decoding measurement."})
    verification: str = field(
        default="linear",
        metadata={"help": "'linear' (masks after the last draft) or 'quadratic' (k masks after every draft)."},
    )

    def __post_init__(self):
        for name in ("num_masks", "steps", "batch_size", "train_prompts", "gen_tokens", "eval_prompts", "eval_tokens"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (0 if name == "eval_prompts" else 1):
                raise ValueError(
                    f"MTPConfig.{name} must be an integer >= {0 if name == 'eval_prompts' else 1}; got {value!r}."
                )
        if self.blocks_per_sequence is not None and (
            isinstance(self.blocks_per_sequence, bool)
            or not isinstance(self.blocks_per_sequence, int)
            or self.blocks_per_sequence < 1
        ):
            raise ValueError(
                f"MTPConfig.blocks_per_sequence must be None or an integer >= 1; got {self.blocks_per_sequence!r}."
            )
        if (
            isinstance(self.warmup_ratio, bool)
            or not isinstance(self.warmup_ratio, (int, float))
            or not (0 <= self.warmup_ratio <= 1)
        ):
            raise ValueError(f"MTPConfig.warmup_ratio must be a number in [0, 1]; got {self.warmup_ratio!r}.")
        for name in ("mtp_loss_weight", "sampler_loss_weight", "consistency_loss_weight", "learning_rate"):
            value = getattr(self, name)
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not (value >= 0 and math.isfinite(value))
            ):
                raise ValueError(f"MTPConfig.{name} must be a finite number >= 0; got {value!r}.")
        for name in ("use_sampler", "soft_targets"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"MTPConfig.{name} must be true or false; got {getattr(self, name)!r}.")
        if self.verification not in VERIFICATIONS:
            raise ValueError(f"MTPConfig.verification must be one of {list(VERIFICATIONS)}; got {self.verification!r}.")
        if self.mtp_loss_weight + self.sampler_loss_weight + self.consistency_loss_weight == 0:
            raise ValueError(
                "MTPConfig: every loss weight is 0; set mtp_loss_weight, sampler_loss_weight or "
                "consistency_loss_weight > 0."
            )


# ---------------------------------------------------------------------------------------------------- the model
class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * y.to(x.dtype)


class SamplerHead(nn.Module):
    """The sampler of https://arxiv.org/abs/2507.11851: a 2-layer MLP on ``concat(emb(previous token), z_mask)`` (the
    MTP-GLoRA layout: each layer Linear → SiLU → RMSNorm, a residual around the second), whose output goes through
    the frozen ``lm_head``."""

    def __init__(self, hidden: int, eps: float = 1e-5):
        super().__init__()
        self.in_proj = nn.Linear(2 * hidden, hidden, bias=False)
        self.in_norm = _RMSNorm(hidden, eps)
        self.out_proj = nn.Linear(hidden, hidden, bias=False)
        self.out_norm = _RMSNorm(hidden, eps)

    def forward(self, prev_emb: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        x = self.in_norm(F.silu(self.in_proj(torch.cat([prev_emb, z], dim=-1))))
        return x + self.out_norm(F.silu(self.out_proj(x)))


class MTPHead(nn.Module):
    """What MTP (https://arxiv.org/abs/2507.11851) trains besides the gated LoRA: the ``<mask>`` embedding row
    (initialised to the mean token embedding) and the sampler head (PyTorch's default Linear init, RMSNorm weights 1, as
    MTP-GLoRA)."""

    def __init__(self, hidden: int, eps: float, mask_init: torch.Tensor):
        super().__init__()
        self.mask_embedding = nn.Parameter(mask_init.detach().clone())
        self.sampler = SamplerHead(hidden, eps)


def _check_gated(model) -> None:
    from peft import PeftModel

    from ..tuners.gated_lora.model import gated_lora_layers

    if not isinstance(model, PeftModel) or not gated_lora_layers(model):
        raise ValueError(
            "MTPModel needs a PeftModel with a gated_lora adapter (get_peft_model(base, "
            f"GatedLoraConfig(...))); got {type(model).__name__} without gated LoRA layers."
        )
    config = model.peft_config[model.active_adapter]
    if (
        getattr(config, "mode", "route") != "route"
        or config.gated_modules is not None
        or config.default_route is not None
    ):
        raise ValueError(
            "MTPModel: the gated_lora adapter must gate every target (mode='route', gated_modules=None) "
            "and have default_route=None, so that regular tokens run the untouched base model; got "
            f"mode={config.mode!r}, gated_modules={config.gated_modules!r}, "
            f"default_route={config.default_route!r}."
        )


class MTPModel(nn.Module):
    """A gated-LoRA ``PeftModel`` plus the MTP head; see the module docstring (https://arxiv.org/abs/2507.11851)."""

    def __init__(self, model, num_masks: int = 4, use_sampler: bool = True, head: Optional[MTPHead] = None):
        super().__init__()
        _check_gated(model)
        if isinstance(num_masks, bool) or not isinstance(num_masks, int) or num_masks < 1:
            raise ValueError(f"MTPModel num_masks must be an integer >= 1; got {num_masks!r}.")
        self.model = model
        self.num_masks = num_masks
        self.use_sampler = use_sampler
        emb = model.get_input_embeddings().weight
        if head is None:
            eps = getattr(model.config, "rms_norm_eps", 1e-5)
            head = MTPHead(emb.shape[1], eps, emb.detach().float().mean(0).to(emb.dtype))
        self.head = head.to(device=emb.device, dtype=emb.dtype)

    # -------------------------------------------------------------------- one forward
    def forward_layout(self, layout: dict, past_key_values=None) -> torch.Tensor:
        """Last hidden states (after the final norm) of a layout from ``mtp_layout``; the gate is on at masks only."""
        ids, is_mask = layout["input_ids"], layout["is_mask"]
        emb = self.model.get_input_embeddings()(ids.clamp_min(0))
        embeds = torch.where(is_mask.unsqueeze(-1), self.head.mask_embedding.to(emb.dtype), emb)
        dtype = embeds.dtype
        mask = torch.zeros(layout["attention_mask"].shape, dtype=dtype, device=embeds.device)
        mask = mask.masked_fill(~layout["attention_mask"], torch.finfo(dtype).min)
        out = self.model(
            inputs_embeds=embeds,
            attention_mask=mask,
            position_ids=layout["position_ids"],
            gate=is_mask,
            past_key_values=past_key_values,
            use_cache=past_key_values is not None,
            output_hidden_states=True,
            logits_to_keep=1,
        )
        return out.hidden_states[-1]

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """The base model's (frozen) output head on ``hidden``."""
        return self.model.get_output_embeddings()(hidden)

    def sampler_logits(self, prev_tokens: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logits of the sampler for mask states ``z`` given the previous tokens (same leading shape)."""
        prev = self.model.get_input_embeddings()(prev_tokens).detach()
        return self.lm_head(self.head.sampler(prev.to(z.dtype), z))

    @torch.no_grad()
    def draft(self, z: torch.Tensor, first_prev: int) -> list[int]:
        """The k draft tokens of one mask block ``z`` ``[k, H]``; the sampler starts from ``first_prev``."""
        if not self.use_sampler:
            return self.lm_head(z).argmax(-1).tolist()
        tokens, prev = [], torch.tensor([first_prev], device=z.device)
        for d in range(z.shape[0]):
            prev = self.sampler_logits(prev, z[d : d + 1]).argmax(-1)
            tokens.append(int(prev))
        return tokens

    # -------------------------------------------------------------------- training loss
    def loss(
        self,
        input_ids: torch.Tensor,
        valid: torch.Tensor,
        gen_start: int,
        config: MTPConfig,
        generator: Optional[torch.Generator] = None,
    ) -> tuple[torch.Tensor, dict]:
        """MTP losses on left-padded self-generated sequences ``input_ids`` ``[B, T]`` whose continuation starts at
        column ``gen_start`` (``valid``: not padding). Regular tokens run once without gradient (a KV cache); the
        mask blocks of the generated positions then run with autograd on top of it."""
        from transformers import DynamicCache

        k = self.num_masks
        B, T = input_ids.shape
        anchors = torch.arange(max(gen_start - 1, 0), T - 2, device=input_ids.device)  # mask 0 predicts anchor + 2
        if anchors.numel() == 0:
            raise ValueError(
                f"MTP loss: sequences of {T} tokens with the continuation at {gen_start} leave no "
                "position with a future token to predict; generate at least 2 tokens."
            )
        if config.blocks_per_sequence is not None and anchors.numel() > config.blocks_per_sequence:
            pick = torch.randperm(anchors.numel(), generator=generator)[: config.blocks_per_sequence]
            anchors = anchors[pick.sort().values.to(anchors.device)]
        with torch.no_grad():
            cache = DynamicCache(config=self.model.config)
            reg = mtp_layout(input_ids, valid, anchors=None, num_masks=k)
            h_reg = self.forward_layout(reg, past_key_values=cache)  # [B, T, H], exactly the base model
        masks = mtp_layout(input_ids, valid, anchors=anchors, num_masks=k, cached=True)
        z = self.forward_layout(masks, past_key_values=cache).view(B, anchors.numel(), k, -1)
        offsets = torch.arange(k, device=input_ids.device)
        target_pos = anchors[:, None] + offsets[None, :] + 2  # [nb, k]
        inside = target_pos < T
        target_pos_c = target_pos.clamp_max(T - 1)
        targets = input_ids[:, target_pos_c]  # [B, nb, k]
        keep = inside[None] & valid[:, target_pos_c] & valid[:, anchors][:, :, None]
        teacher_pos = target_pos_c - 1  # the regular position whose next-token prediction is the same token
        z_teacher = h_reg[:, teacher_pos]  # [B, nb, k, H], no gradient
        zk, n = z[keep], keep.sum().clamp_min(1)
        soft = F.softmax(self.lm_head(z_teacher[keep]).float(), -1) if config.soft_targets else None
        tgt = targets[keep]

        def ce(logits):
            logp = F.log_softmax(logits.float(), -1)
            return -(soft * logp).sum(-1).mean() if soft is not None else F.nll_loss(logp, tgt)

        terms, total = {}, z.new_zeros((), dtype=torch.float32)
        if config.mtp_loss_weight:
            logits = self.lm_head(zk)
            terms["mtp_ce"] = ce(logits)
            terms["mtp_acc"] = (logits.argmax(-1) == tgt).float().mean()
            total = total + config.mtp_loss_weight * terms["mtp_ce"]
        if config.sampler_loss_weight and self.use_sampler:
            prev = input_ids[:, teacher_pos][keep]  # the true previous token (teacher forcing)
            logits = self.sampler_logits(prev, zk)
            terms["sampler_ce"] = ce(logits)
            terms["sampler_acc"] = (logits.argmax(-1) == tgt).float().mean()
            total = total + config.sampler_loss_weight * terms["sampler_ce"]
        if config.consistency_loss_weight:
            terms["consistency"] = (zk.float() - z_teacher[keep].float()).pow(2).mean()
            total = total + config.consistency_loss_weight * terms["consistency"]
        terms["targets"] = n.float()
        return total, {key: float(v.detach()) for key, v in terms.items()}

    # -------------------------------------------------------------------- saving
    def trainable_parameters(self) -> list:
        """The parameters MTP trains: the gated LoRA, the sampler and the mask row."""
        return [p for p in self.parameters() if p.requires_grad]

    def save_pretrained(self, folder, tokenizer=None, extra: Optional[dict] = None) -> Path:
        """Adapter (``save_pretrained`` of the PeftModel), ``mtp_head.safetensors`` (mask row + sampler) and
        ``mtp_config.json``, each file written atomically."""
        from safetensors.torch import save

        from .._io import atomic_write, atomic_write_json
        from ..runner import save_adapter

        folder = Path(folder)
        save_adapter(self.model, tokenizer, folder)
        state = {k: v.detach().contiguous().cpu() for k, v in self.head.state_dict().items()}
        data = save(state)
        atomic_write(folder / HEAD_FILE, lambda f: f.write(data), binary=True)
        atomic_write_json(
            folder / CONFIG_FILE,
            {
                "num_masks": self.num_masks,
                "use_sampler": self.use_sampler,
                "paper": "https://arxiv.org/abs/2507.11851",
                **(extra or {}),
            },
        )
        return folder

    @classmethod
    def from_pretrained(cls, base, folder) -> "MTPModel":
        """Load what ``save_pretrained`` wrote onto ``base`` (a fresh base model)."""
        from peft import PeftModel
        from safetensors.torch import load_file

        from .._io import safetensors_is_whole

        folder = Path(folder)
        head_file = folder / HEAD_FILE
        if not (folder / CONFIG_FILE).is_file() or not safetensors_is_whole(head_file):
            raise ValueError(
                f"{folder} is not a complete MTP folder: {CONFIG_FILE} and a whole {HEAD_FILE} are needed."
            )
        meta = json.loads((folder / CONFIG_FILE).read_text())
        model = PeftModel.from_pretrained(base, str(folder))
        state = load_file(str(head_file))
        emb = model.get_input_embeddings().weight
        head = MTPHead(emb.shape[1], getattr(model.config, "rms_norm_eps", 1e-5), state["mask_embedding"])
        head.load_state_dict(state)
        return cls(model, num_masks=int(meta["num_masks"]), use_sampler=bool(meta["use_sampler"]), head=head)


# ---------------------------------------------------------------------------------------------------- layout
def mtp_layout(
    input_ids: torch.Tensor,
    valid: Optional[torch.Tensor],
    anchors: Optional[torch.Tensor],
    num_masks: int,
    past: int = 0,
    cached: bool = False,
) -> dict:
    """Inputs of one MTP forward (https://arxiv.org/abs/2507.11851): regular tokens ``input_ids`` ``[B, T]`` followed by
    ``num_masks`` masks after each regular index in ``anchors`` (None: no masks), with explicit position ids and a 4-D
    boolean attention mask ``[B, 1, queries, keys]`` (True = attend).

    ``past``: keys already in the KV cache (all attended). ``cached=True``: the regular tokens themselves are already in
    the cache (they were the previous forward, e.g. training's no-grad pass): the queries are the masks only and the
    keys are ``[regular tokens, masks]``. Regular positions: ``past + cumsum(valid) - 1`` (left padding); mask
    ``d`` after regular ``i`` sits at ``pos(i) + d + 1``. Padding queries attend themselves only, so no row of the mask
    is empty."""
    B, T = input_ids.shape
    device = input_ids.device
    valid = torch.ones_like(input_ids, dtype=torch.bool) if valid is None else valid.bool()
    reg_pos = past + valid.long().cumsum(1) - 1
    reg_pos = torch.where(valid, reg_pos, torch.zeros_like(reg_pos))
    nb = 0 if anchors is None else anchors.numel()
    k = num_masks
    reg_idx = torch.arange(T, device=device)
    if nb:
        mask_anchor = anchors.repeat_interleave(k)  # [nb*k]
        mask_d = torch.arange(k, device=device).repeat(nb)
        mask_block = torch.arange(nb, device=device).repeat_interleave(k)
        mask_pos = reg_pos[:, mask_anchor] + mask_d + 1
    else:
        mask_anchor = mask_d = mask_block = torch.zeros(0, dtype=torch.long, device=device)
        mask_pos = reg_pos[:, :0]
    # keys: [past, regular T, masks]; queries: [regular T (unless cached), masks]
    key_is_reg = torch.cat(
        [torch.ones(T, dtype=torch.bool, device=device), torch.zeros(nb * k, dtype=torch.bool, device=device)]
    )
    key_reg = torch.cat([reg_idx, torch.full((nb * k,), -1, device=device)])
    key_block = torch.cat([torch.full((T,), -1, device=device), mask_block])
    key_d = torch.cat([torch.full((T,), -1, device=device), mask_d])
    key_valid = torch.cat([valid, torch.ones(B, nb * k, dtype=torch.bool, device=device)], dim=1)  # [B, K]
    q_sl = slice(T, None) if cached else slice(None)
    q_anchor = torch.cat([reg_idx, mask_anchor])[q_sl]
    q_block = torch.cat([torch.full((T,), -1, device=device), mask_block])[q_sl]
    q_d = torch.cat([torch.full((T,), -1, device=device), mask_d])[q_sl]
    allow_reg = key_is_reg[None, :] & (key_reg[None, :] <= q_anchor[:, None])
    allow_mask = (~key_is_reg[None, :]) & (key_block[None, :] == q_block[:, None]) & (key_d[None, :] <= q_d[:, None])
    allow = (allow_reg | allow_mask)[None] & key_valid[:, None, :]  # [B, Q, K]
    diag = torch.zeros_like(allow[0])
    q_index = torch.arange(allow.shape[1], device=device) + (T if cached else 0)
    diag[torch.arange(allow.shape[1], device=device), q_index] = True
    allow = allow | diag[None]  # each query sees itself (padding rows are never empty)
    if past:
        allow = torch.cat([torch.ones(B, allow.shape[1], past, dtype=torch.bool, device=device), allow], dim=2)
    ids = torch.cat([input_ids, torch.full((B, nb * k), -1, dtype=input_ids.dtype, device=device)], dim=1)
    is_mask = torch.cat(
        [torch.zeros(B, T, dtype=torch.bool, device=device), torch.ones(B, nb * k, dtype=torch.bool, device=device)],
        dim=1,
    )
    pos = torch.cat([reg_pos, mask_pos], dim=1)
    if cached:
        ids, is_mask, pos = ids[:, T:], is_mask[:, T:], pos[:, T:]
    return {"input_ids": ids, "is_mask": is_mask, "position_ids": pos, "attention_mask": allow[:, None]}


# ---------------------------------------------------------------------------------------------------- decoding
@torch.no_grad()
def mtp_generate(
    mtp: MTPModel, input_ids: torch.Tensor, max_new_tokens: int, verification: str = "linear", eos_token_id=None
) -> tuple[torch.Tensor, dict]:
    """Greedy generation with speculative multi-token drafts (https://arxiv.org/abs/2507.11851), one prompt
    (``input_ids`` ``[1, P]``).

    Each forward holds the token to verify from, the drafts and the masks; the base model's greedy prediction at each
    regular position (gate off) verifies the next draft; the longest agreeing prefix plus the base model's own next
    token is accepted, the KV cache is cut back to the accepted regular tokens. The output equals plain greedy
    ``generate()`` up to floating-point differences between a chunked and a one-token forward (near-ties). Returns the
    tokens ``[1, P + n]`` and stats (forwards, tokens per forward, acceptance)."""
    from transformers import DynamicCache

    if verification not in VERIFICATIONS:
        raise ValueError(f"mtp_generate verification must be one of {list(VERIFICATIONS)}; got {verification!r}.")
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(
            f"mtp_generate decodes one prompt: input_ids must be [1, length]; got {list(input_ids.shape)}."
        )
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"mtp_generate max_new_tokens must be an integer >= 1; got {max_new_tokens!r}.")
    eos = set([eos_token_id] if isinstance(eos_token_id, int) else (eos_token_id or []))
    was_training = mtp.training
    mtp.eval()
    k, device = mtp.num_masks, input_ids.device
    cache = DynamicCache(config=mtp.model.config)
    P = input_ids.shape[1]
    generated: list[int] = []
    forwards, drafted, accepted_drafts = 0, 0, 0
    regular, drafts = input_ids[0].tolist(), []
    past = 0
    try:
        while True:
            chunk = torch.tensor([regular + drafts], device=device)
            n_reg = chunk.shape[1]
            first = n_reg - 1 - len(drafts)  # regular index of the token the drafts continue
            if verification == "quadratic":
                anchors = torch.arange(first, n_reg, device=device)
            else:
                anchors = torch.tensor([n_reg - 1], device=device)
            layout = mtp_layout(chunk, None, anchors, k, past=past)
            hidden = mtp.forward_layout(layout, past_key_values=cache)[0]
            forwards += 1
            preds = mtp.lm_head(hidden[first:n_reg]).argmax(-1).tolist()  # base greedy after each candidate
            a = 0
            while a < len(drafts) and drafts[a] == preds[a]:
                a += 1
            drafted += len(drafts)
            accepted_drafts += a
            new = drafts[:a] + [preds[a]]
            stop = False
            for tok in new:
                generated.append(tok)
                if tok in eos or len(generated) >= max_new_tokens:
                    stop = True
                    break
            if stop:
                break
            keep = past + first + 1 + a  # cache: everything before, the verified token and the accepted drafts
            if keep < cache.get_seq_length():
                cache.crop(keep - cache.get_seq_length())  # a negative count removes that many trailing entries
            past = keep
            anchor = first + a
            block = (anchors == anchor).nonzero()
            if block.numel():
                b = int(block[0, 0])
                z = hidden[n_reg + b * k : n_reg + (b + 1) * k]
                drafts = mtp.draft(z, preds[a])
            else:
                drafts = []
            regular = [preds[a]]
    finally:
        mtp.train(was_training)
    out = torch.cat([input_ids, torch.tensor([generated], dtype=input_ids.dtype, device=device)], dim=1)
    stats = {
        "new_tokens": len(generated),
        "forwards": forwards,
        "tokens_per_forward": len(generated) / forwards,
        "drafted": drafted,
        "accepted_drafts": accepted_drafts,
        "acceptance_rate": accepted_drafts / drafted if drafted else 0.0,
        "prompt_tokens": P,
    }
    return out, stats


# ---------------------------------------------------------------------------------------------------- data, training
def mtp_prompt(tokenizer, question: str) -> str:
    """The prompt of a GSM question for MTP (https://arxiv.org/abs/2507.11851): the chat template when the tokenizer has
    one (SmolLM2-Instruct), else the ``Question: ... Answer:`` format of ``peft-ext train``."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    from ..data.preference import gsm_prompt

    return gsm_prompt(question)


@torch.no_grad()
def self_generate(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8) -> list[tuple]:
    """The model's own greedy continuations, MTP's training data (https://arxiv.org/abs/2507.11851): ``(prompt ids,
    generated ids)`` per prompt, the generated ids cut after the first EOS. With a gated-LoRA PeftModel and no gate
    input this is the base model."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(prompts), batch_size):
            enc = tokenizer(
                prompts[start : start + batch_size], return_tensors="pt", padding=True, add_special_tokens=False
            ).to(model.device)
            enc = {key: enc[key] for key in ("input_ids", "attention_mask")}  # BERT-style tokenizers add token_type_ids
            gen = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
            width = enc["input_ids"].shape[1]
            for row in range(gen.shape[0]):
                prompt = enc["input_ids"][row][enc["attention_mask"][row].bool()].tolist()
                new = gen[row, width:].tolist()
                if tokenizer.eos_token_id in new:
                    new = new[: new.index(tokenizer.eos_token_id) + 1]
                out.append((prompt, new))
    finally:
        tokenizer.padding_side = side
        model.train(was_training)
    return out


def collate(pairs: list[tuple], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, int]:
    """MTP batches (https://arxiv.org/abs/2507.11851): left-pad the prompts and right-pad the continuations so every
    continuation starts at one column; returns ``(input_ids, valid, gen_start)``."""
    width_p = max(len(p) for p, _ in pairs)
    width_g = max(len(g) for _, g in pairs)
    ids = torch.full((len(pairs), width_p + width_g), pad_id, dtype=torch.long)
    valid = torch.zeros_like(ids, dtype=torch.bool)
    for row, (p, g) in enumerate(pairs):
        ids[row, width_p - len(p) : width_p] = torch.tensor(p, dtype=torch.long)
        ids[row, width_p : width_p + len(g)] = torch.tensor(g, dtype=torch.long)
        valid[row, width_p - len(p) : width_p + len(g)] = True
    return ids, valid, width_p


def train_mtp(
    mtp: MTPModel,
    data: list[tuple],
    config: MTPConfig,
    pad_id: int,
    seed: int = 0,
    progress: bool = False,
    on_step=None,
    max_seconds: Optional[float] = None,
) -> list[dict]:
    """MTP training (https://arxiv.org/abs/2507.11851): AdamW on the gated LoRA, the sampler and the mask row for
    ``config.steps`` steps over ``data`` (pairs from ``self_generate``), batches drawn in a seeded order; returns one
    record of losses per step. ``max_seconds`` stops earlier once that much wall-clock time has passed (a time budget,
    for benchmarks)."""
    params = mtp.trainable_parameters()
    if not params:
        raise ValueError("train_mtp: nothing to train (the adapter, the sampler and the mask row are all frozen).")
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    warmup = max(1, round(config.warmup_ratio * config.steps)) if config.warmup_ratio else 0
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda i: min(1.0, (i + 1) / warmup) if warmup else 1.0)
    generator = torch.Generator().manual_seed(seed)
    usable = [pair for pair in data if len(pair[1]) >= 2]
    if not usable:
        raise ValueError("train_mtp: no continuation has 2 or more tokens; raise gen_tokens or use other prompts.")
    order: list[int] = []
    history = []
    mtp.train()
    bar = None
    began = time.perf_counter()
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, desc="mtp")
    for step in range(config.steps):
        batch = []
        while len(batch) < min(config.batch_size, len(usable)):
            if not order:
                order = torch.randperm(len(usable), generator=generator).tolist()
            batch.append(usable[order.pop()])
        ids, valid, gen_start = collate(batch, pad_id)
        device = mtp.head.mask_embedding.device
        loss, terms = mtp.loss(ids.to(device), valid.to(device), gen_start, config, generator=generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        record = {"step": step + 1, "loss": float(loss.detach()), **terms}
        history.append(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(
                loss=f"{record['loss']:.3f}", acc=f"{terms.get('sampler_acc', terms.get('mtp_acc', 0)):.2f}"
            )
        if on_step is not None:
            on_step(record)
        if max_seconds is not None and time.perf_counter() - began > max_seconds:
            break
    if bar is not None:
        bar.close()
    mtp.eval()
    return history


@torch.no_grad()
def measure_decoding(
    mtp: MTPModel, tokenizer, prompts: list[str], max_new_tokens: int, verification: str = "linear"
) -> dict:
    """MTP decoding measurement (https://arxiv.org/abs/2507.11851): plain greedy ``generate()`` vs ``mtp_generate`` on
    each prompt, one at a time, timed alternately: tokens per forward, acceptance, identical outputs and the wall-clock
    speed-up (sum of plain times / sum of MTP times). Both stop at the tokenizer's EOS (else the model's
    generation-config EOS)."""
    model = mtp.model
    model.eval()
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else model.generation_config.eos_token_id
    rows = []
    for text in prompts:
        ids = tokenizer(text, return_tensors="pt", add_special_tokens=False)["input_ids"].to(model.device)
        start = time.perf_counter()
        plain = model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=eos,
        )
        t_plain = time.perf_counter() - start
        start = time.perf_counter()
        out, stats = mtp_generate(mtp, ids, max_new_tokens, verification=verification, eos_token_id=eos)
        t_mtp = time.perf_counter() - start
        rows.append({**stats, "identical": bool(torch.equal(plain, out)), "plain_s": t_plain, "mtp_s": t_mtp})
    if not rows:
        return {}
    tokens = sum(r["new_tokens"] for r in rows)
    return {
        "prompts": len(rows),
        "verification": verification,
        "tokens_per_forward": tokens / sum(r["forwards"] for r in rows),
        "acceptance_rate": sum(r["accepted_drafts"] for r in rows) / max(1, sum(r["drafted"] for r in rows)),
        "identical": sum(r["identical"] for r in rows) / len(rows),
        "plain_s": sum(r["plain_s"] for r in rows),
        "mtp_s": sum(r["mtp_s"] for r in rows),
        "speedup": sum(r["plain_s"] for r in rows) / sum(r["mtp_s"] for r in rows),
        "new_tokens": tokens,
        "per_prompt": rows,
    }


def mtp_config_from_recipe(recipe) -> MTPConfig:
    """``MTPConfig`` (https://arxiv.org/abs/2507.11851) from the recipe's ``trainer.args`` (unknown keys: a ValueError
    naming them and the allowed)."""
    from ..recipe import trainer_args_config

    return trainer_args_config(recipe, MTPConfig)


def _plot(history: list[dict], path: Path) -> Optional[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    from .._io import atomic_savefig

    fig, ax = plt.subplots(figsize=(6, 3.4))
    steps = [r["step"] for r in history]
    for key in ("loss", "mtp_ce", "sampler_ce", "consistency"):
        if any(key in r for r in history):
            ax.plot(steps, [r.get(key, float("nan")) for r in history], label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax2 = ax.twinx()
    for key in ("mtp_acc", "sampler_acc"):
        if any(key in r for r in history):
            ax2.plot(steps, [r.get(key, float("nan")) for r in history], linestyle=":", label=key)
    ax2.set_ylabel("draft accuracy (teacher-forced)")
    handles = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(handles=handles, fontsize=7, loc="best")
    ax.set_title("MTP training (gated LoRA + sampler)")
    fig.tight_layout()
    atomic_savefig(fig, path, dpi=110)
    plt.close(fig)
    return path


def _mtp_folder_complete(folder: Path) -> bool:
    from .._io import adapter_folder_is_whole, safetensors_is_whole

    return (
        adapter_folder_is_whole(folder)
        and (folder / CONFIG_FILE).is_file()
        and safetensors_is_whole(folder / HEAD_FILE)
    )


def check_recipe(recipe) -> None:
    """What ``trainer: mtp`` needs besides its ``trainer.args``: a gated LoRA on a causal LM, GSM prompts."""
    if recipe.method.name != "gated_lora":
        raise ValueError(
            f"trainer 'mtp' needs method.name 'gated_lora' (the gate is the method); got {recipe.method.name!r}."
        )
    if recipe.model.task != "causal_lm" or recipe.data.name != "gsm":
        raise ValueError(
            f"trainer 'mtp' needs model.task 'causal_lm' and data.name 'gsm'; got {recipe.model.task!r} "
            f"with {recipe.data.name!r}."
        )


def train_mtp_recipe(recipe, resume: bool = False, quiet: bool = False) -> dict:
    """``peft-ext train`` for multi-token prediction (https://arxiv.org/abs/2507.11851), ``trainer: {name: mtp, args:
    {...MTPConfig...}}``: self-generated greedy data on the recipe's GSM prompts, MTP training, the decoding measurement
    on held-out prompts; writes ``adapter/`` (adapter, ``mtp_head.safetensors``, ``mtp_config.json``), ``metrics.json``
    and ``results.png``, each atomically. With ``resume`` and a complete ``adapter/``, training is skipped and only the
    measurement runs."""
    from peft import get_peft_model

    from .._io import atomic_write_json
    from ..recipe import to_dict
    from ..runner.reporting import device_name
    from ..runner import build_peft_config, load_raw_splits, load_tokenizer_and_model

    check_recipe(recipe)
    config = mtp_config_from_recipe(recipe)
    torch.manual_seed(recipe.seed)
    began = time.time()
    out = Path(recipe.output_dir)
    tokenizer, base = load_tokenizer_and_model(recipe)
    train_rows, eval_rows = load_raw_splits(recipe)
    folder = out / "adapter"
    history: list[dict] = []
    if resume and _mtp_folder_complete(folder):
        mtp = MTPModel.from_pretrained(base, folder)
        previous = out / "metrics.json"
        if previous.is_file():
            history = json.loads(previous.read_text()).get("history", [])
    else:
        model = get_peft_model(base, build_peft_config(recipe))
        mtp = MTPModel(model, num_masks=config.num_masks, use_sampler=config.use_sampler)
        questions = list(train_rows["question"])[: config.train_prompts]
        data = self_generate(model, tokenizer, [mtp_prompt(tokenizer, q) for q in questions], config.gen_tokens)
        history = train_mtp(mtp, data, config, tokenizer.pad_token_id, seed=recipe.seed, progress=not quiet)
        mtp.save_pretrained(folder, tokenizer, extra={"recipe": recipe.name})
    train_time = time.time() - began
    prompts = [mtp_prompt(tokenizer, q) for q in list(eval_rows["question"])[: config.eval_prompts]]
    decoding = measure_decoding(mtp, tokenizer, prompts, config.eval_tokens, config.verification)
    metrics = {
        "name": recipe.name,
        "trainer": "mtp",
        "method": recipe.method.name,
        "seed": recipe.seed,
        "paper": "https://arxiv.org/abs/2507.11851",
        "mtp": asdict(config),
        "budget": {
            "steps": config.steps,
            "batch_size": config.batch_size,
            "train_prompts": config.train_prompts,
            "gen_tokens": config.gen_tokens,
            "train_time_s": train_time,
        },
        "final": history[-1] if history else None,
        "decoding": {k: v for k, v in decoding.items() if k != "per_prompt"},
        "per_prompt": decoding.get("per_prompt", []),
        "history": history,
        "device": device_name(),
        "recipe": to_dict(recipe),
    }
    atomic_write_json(out / "metrics.json", metrics)
    if recipe.evaluation.plot and history:
        _plot(history, out / "results.png")
    if not quiet:
        d = metrics["decoding"]
        if d:
            print(
                f"mtp — {recipe.name}: {d['tokens_per_forward']:.2f} tokens/forward, acceptance "
                f"{d['acceptance_rate']:.2f}, identical {d['identical']:.2f}, speed-up {d['speedup']:.2f}x "
                f"({d['verification']}, {d['prompts']} prompts)"
            )
        print(f"adapter: {folder}  metrics: {out / 'metrics.json'}")
    return metrics
