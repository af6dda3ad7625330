"""FLASC (Kuo et al., arXiv 2406.05233; the withdrawn CELLM, arXiv 2407.20557, describes the same method) as pure
functions over adapter state dicts: the density schedule, the global top-k download mask, client training of the
dense adapter from the masked start, the client delta, the global top-k upload sparsification, optional DP clipping
and Gaussian noise, and the server pseudo-gradient step.

The exchanged state is a ``{name: tensor}`` dict of the model's trainable parameters (the adapter, plus any
``modules_to_save`` head), so any PEFT or peft-ext tuner works. What travels is a ``SparsePayload`` (per tensor: flat
indices and values, or values only when dense); bytes are counted from those arrays. The Flower strategy in
``peft_ext.federated.flower`` and the in-process loop ``run_local`` both drive the same ``FlascServer`` and
``client_update``, so they compute the same rounds.

Sign convention (as upstream): a client sends ``Δ = start − trained`` (a pseudo-gradient); the server sets
``p.grad = ΣΔ / n`` and steps its optimizer.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Callable, Iterable, Literal, Optional

import numpy as np
import torch

logger = logging.getLogger(__name__)


@dataclass
class FlascConfig:
    """Settings of a FLASC run (defaults: the official ``train_sparse_lora_dp.py`` arguments, except rounds and
    clients per round, which are sized for CPU)."""

    rounds: int = field(default=10, metadata={"help": "Server rounds (official --server-rounds, default 200)."})
    clients_per_round: int = field(
        default=10, metadata={"help": "Clients sampled per round without replacement (official --server-batch)."}
    )
    server_opt: Literal["adamw", "sgd"] = field(
        default="adamw",
        metadata={"help": "Server optimizer applied to the averaged pseudo-gradient: adamw (FedAdam-style, official "
                  "'adam' = torch AdamW) or sgd (sgd with server_lr 1.0 is FedAvg)."},
    )
    server_lr: float = field(default=1e-3, metadata={"help": "Server learning rate (official --server-lr)."})
    server_weight_decay: float = field(
        default=0.01, metadata={"help": "AdamW weight decay on the server (torch's default, which upstream keeps)."}
    )
    client_lr: float = field(default=1e-3, metadata={"help": "Client SGD learning rate (official --client-lr)."})
    client_momentum: float = field(default=0.9, metadata={"help": "Client SGD momentum (official: 0.9)."})
    client_epochs: int = field(default=1, metadata={"help": "Local epochs per round (official --client-epochs)."})
    client_batch: int = field(default=16, metadata={"help": "Local batch size (official --client-batch)."})
    client_freeze: bool = field(
        default=False, metadata={"help": "Mask client gradients with the download mask (official --client-freeze)."}
    )
    server_freeze: bool = field(
        default=False,
        metadata={"help": "Compute the download mask once, at round index 1 after one dense round, instead of every "
                  "round (official --server-freeze)."},
    )
    dl_density: float = field(default=1.0, metadata={"help": "Download density d_dl in (0, 1] (1 = dense)."})
    dl_density_decay: float = field(
        default=1.0, metadata={"help": "Download density factor per decay_freq rounds, in (0, 1]."}
    )
    ul_density: float = field(default=1.0, metadata={"help": "Upload density d_ul in (0, 1] (1 = dense)."})
    ul_density_decay: float = field(
        default=1.0, metadata={"help": "Upload density factor per decay_freq rounds, in (0, 1]."}
    )
    decay_freq: int = field(default=1, metadata={"help": "Rounds between density decays (official --decay-freq)."})
    l2_clip_norm: float = field(
        default=0.0, metadata={"help": "DP: clip each client delta to this L2 norm, divide the sum by it; 0 = off."}
    )
    noise_multiplier: float = field(
        default=0.0, metadata={"help": "DP: std of the Gaussian noise added to the (clip-normalised) sum; 0 = off."}
    )
    eval_masked: bool = field(
        default=True, metadata={"help": "Evaluate the global adapter times the round's download mask (official)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of client sampling, DP noise and client data order."})

    def __post_init__(self):
        for name in ("dl_density", "ul_density"):
            check_density(getattr(self, name), name)
        for name in ("dl_density_decay", "ul_density_decay"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
                raise ValueError(f"FlascConfig.{name} must be a number in (0, 1]; got {value!r}.")
        for name in ("rounds", "clients_per_round", "client_epochs", "client_batch", "decay_freq"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"FlascConfig.{name} must be an integer >= 1; got {value!r}.")
        for name in ("server_lr", "client_lr"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not value > 0 or not math.isfinite(value):
                raise ValueError(f"FlascConfig.{name} must be a finite number > 0; got {value!r}.")
        for name in ("server_weight_decay", "client_momentum", "l2_clip_norm", "noise_multiplier"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or value < 0 or not math.isfinite(value):
                raise ValueError(f"FlascConfig.{name} must be a finite number >= 0; got {value!r}.")
        if self.server_opt not in ("adamw", "sgd"):
            raise ValueError(f"FlascConfig.server_opt must be 'adamw' or 'sgd'; got {self.server_opt!r}.")


def check_density(value, name: str = "density") -> float:
    """``value`` as a float when it lies in (0, 1]; otherwise a ValueError naming ``name``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1] (1 = dense); got {value!r}.")
    return float(value)


def density_at(initial: float, decay: float, rnd: int, decay_freq: int) -> float:
    """Density of round index ``rnd`` (0-based): ``initial · decay^⌊rnd / decay_freq⌋`` (official schedule)."""
    return initial * decay ** (rnd // decay_freq)


def flatten(state: dict) -> torch.Tensor:
    """All tensors of ``state`` (in its key order) as one flat vector."""
    return torch.cat([t.reshape(-1) for t in state.values()])


def unflatten(flat: torch.Tensor, like: dict) -> dict:
    """Split a flat vector back into tensors shaped like ``like``."""
    out, start = {}, 0
    for name, t in like.items():
        out[name] = flat[start:start + t.numel()].reshape(t.shape)
        start += t.numel()
    return out


def topk_mask(state: dict, density: float) -> dict:
    """Boolean masks keeping the ``int(numel · density)`` largest ``|values|`` over ALL tensors of ``state`` together
    (global, not per tensor; ``torch.topk`` picks among ties, as upstream's ``get_topk_mask``)."""
    check_density(density)
    flat = flatten(state).abs()
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    _, idx = torch.topk(flat, k=int(flat.numel() * density))
    keep[idx] = True
    return unflatten(keep, state)


def apply_mask(state: dict, mask: Optional[dict]) -> dict:
    """``state ⊙ mask`` (a copy); ``mask=None`` copies ``state``."""
    if mask is None:
        return {n: t.detach().clone() for n, t in state.items()}
    return {n: t.detach() * mask[n] for n, t in state.items()}


def client_delta(start: dict, trained: dict) -> dict:
    """The pseudo-gradient a client sends: ``start − trained`` (the negative of its update)."""
    return {n: start[n] - trained[n].detach() for n in start}


def sparsify_topk(delta: dict, density: float) -> tuple[dict, dict]:
    """Global top-k upload sparsification: ``(delta ⊙ mask, mask)`` with ``int(numel · density)`` entries kept."""
    mask = topk_mask(delta, density)
    return {n: d * mask[n] for n, d in delta.items()}, mask


# --------------------------------------------------------------------------------------------- payloads on the wire


@dataclass
class SparsePayload:
    """What travels: per tensor name, its shape, the flat indices kept (``None`` = dense) and their float32 values."""

    shapes: dict
    indices: dict
    values: dict

    @property
    def nbytes(self) -> int:
        """Bytes of the index and value arrays (the metadata — names, shapes — is not counted)."""
        total = 0
        for name in self.values:
            total += self.values[name].nbytes
            if self.indices.get(name) is not None:
                total += self.indices[name].nbytes
        return total

    @property
    def entries(self) -> int:
        """Number of values sent."""
        return sum(int(v.size) for v in self.values.values())


def _index_dtype(numel: int):
    return np.int32 if numel < 2**31 else np.int64


def encode(state: dict, mask: Optional[dict] = None) -> SparsePayload:
    """``state`` as a payload: only the masked-in entries (indices + values) when ``mask`` drops something, else
    dense values."""
    shapes, indices, values = {}, {}, {}
    dense = mask is None or all(bool(m.all()) for m in mask.values())
    for name, t in state.items():
        flat = t.detach().reshape(-1).to(torch.float32)
        shapes[name] = list(t.shape)
        if dense:
            indices[name] = None
            values[name] = flat.numpy().copy()
        else:
            idx = mask[name].reshape(-1).nonzero().reshape(-1)
            indices[name] = idx.numpy().astype(_index_dtype(flat.numel()))
            values[name] = flat[idx].numpy().copy()
    return SparsePayload(shapes, indices, values)


def decode(payload: SparsePayload, like: Optional[dict] = None) -> tuple[dict, Optional[dict]]:
    """``(state, mask)`` from a payload (zeros where nothing was sent; ``mask`` is ``None`` for a dense payload).
    With ``like``, the payload is first checked against it (``validate_payload``)."""
    if like is not None:
        validate_payload(payload, like)
    state, mask, sparse = {}, {}, False
    for name, shape in payload.shapes.items():
        numel = int(np.prod(shape)) if shape else 1
        idx = payload.indices.get(name)
        vals = torch.from_numpy(np.asarray(payload.values[name], dtype=np.float32).copy())
        if idx is None:
            state[name] = vals.reshape(shape)
            mask[name] = torch.ones(shape, dtype=torch.bool)
        else:
            sparse = True
            flat = torch.zeros(numel, dtype=torch.float32)
            keep = torch.zeros(numel, dtype=torch.bool)
            idx_t = torch.from_numpy(np.asarray(idx, dtype=np.int64))
            flat[idx_t] = vals
            keep[idx_t] = True
            state[name], mask[name] = flat.reshape(shape), keep.reshape(shape)
    return state, (mask if sparse else None)


class UpdateRejected(ValueError):
    """A client's update does not match the global adapter (keys, shapes, indices or values)."""


def validate_payload(payload: SparsePayload, like: dict) -> None:
    """Raise ``UpdateRejected`` naming what differs when ``payload`` is not an update of ``like``'s tensors."""
    missing = sorted(set(like) - set(payload.shapes))
    extra = sorted(set(payload.shapes) - set(like))
    if missing or extra:
        raise UpdateRejected(f"state dict keys differ from the global adapter: missing {missing[:5]}"
                             f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
                             f"{' ...' if len(extra) > 5 else ''}.")
    for name, t in like.items():
        shape = list(payload.shapes[name])
        if shape != list(t.shape):
            raise UpdateRejected(f"tensor {name!r} has shape {shape}; the global adapter has {list(t.shape)}.")
        values = np.asarray(payload.values.get(name))
        idx = payload.indices.get(name)
        numel = t.numel()
        if idx is None:
            if values.size != numel:
                raise UpdateRejected(f"tensor {name!r}: {values.size} dense values for {numel} entries.")
        else:
            idx = np.asarray(idx)
            if idx.ndim != 1 or idx.size != values.size or not np.issubdtype(idx.dtype, np.integer):
                raise UpdateRejected(f"tensor {name!r}: indices and values do not pair up "
                                     f"({idx.size} indices, {values.size} values).")
            if idx.size and (idx.min() < 0 or idx.max() >= numel):
                raise UpdateRejected(f"tensor {name!r}: index out of range [0, {numel}).")
        if not np.all(np.isfinite(values)):
            raise UpdateRejected(f"tensor {name!r} holds NaN or infinite values.")


# ------------------------------------------------------------------------------------------------------ client side


def client_update(model, start: dict, batches: Iterable[dict], cfg: FlascConfig, mask: Optional[dict] = None,
                  ul_density: float = 1.0, seed: int = 0) -> tuple[SparsePayload, dict]:
    """One client's round: load ``start`` (the masked global adapter) into ``model``'s trainable parameters, train the
    DENSE adapter with SGD (momentum) for ``cfg.client_epochs`` over ``batches`` (``client_freeze`` masks the
    gradients with ``mask``), and return the upload payload of ``Δ = start − trained`` sparsified to ``ul_density``
    (global top-k), with a few statistics (loss, examples, steps).

    ``batches`` is re-iterated once per epoch; each batch is a dict of model inputs with ``labels``."""
    check_density(ul_density, "ul_density")
    params = trainable_parameters(model)
    if set(params) != set(start):
        raise UpdateRejected(f"client model and download differ in keys: {sorted(set(params) ^ set(start))[:5]}.")
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(start[name])
    opt = torch.optim.SGD(list(params.values()), lr=cfg.client_lr, momentum=cfg.client_momentum)
    model.train()
    loss_sum, examples, steps = 0.0, 0, 0
    for _ in range(cfg.client_epochs):
        for batch in batches:
            loss = model(**batch).loss
            opt.zero_grad()
            loss.backward()
            if cfg.client_freeze and mask is not None:
                for name, p in params.items():
                    if p.grad is not None:
                        p.grad *= mask[name]
            opt.step()
            n = int(batch["labels"].shape[0])
            loss_sum += float(loss.detach()) * n
            examples += n
            steps += 1
    delta = client_delta(start, {n: p.detach() for n, p in params.items()})
    up_mask = None
    if ul_density < 1:
        delta, up_mask = sparsify_topk(delta, ul_density)
    stats = {"loss": loss_sum / max(examples, 1), "examples": examples, "steps": steps}
    return encode(delta, up_mask), stats


def trainable_parameters(model) -> dict:
    """``{name: parameter}`` of what requires grad: the exchanged adapter state (plus any ``modules_to_save``)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------------ server side


class FlascServer:
    """The server's side of FLASC: holds the global adapter, the download mask, the server optimizer and the RNGs of
    client sampling and DP noise. One round: ``begin_round`` → ``download`` / ``sample`` → ``step(payloads)``."""

    def __init__(self, global_state: dict, cfg: FlascConfig, num_clients: int):
        if num_clients < 1:
            raise ValueError(f"num_clients must be >= 1; got {num_clients}.")
        self.cfg, self.num_clients = cfg, num_clients
        self.params = {n: torch.nn.Parameter(t.detach().clone().to(torch.float32)) for n, t in global_state.items()}
        self.mask = {n: torch.ones_like(p, dtype=torch.bool) for n, p in self.params.items()}
        opt_cls = torch.optim.AdamW if cfg.server_opt == "adamw" else torch.optim.SGD
        extra = {"weight_decay": cfg.server_weight_decay} if cfg.server_opt == "adamw" else {}
        self.opt = opt_cls(list(self.params.values()), lr=cfg.server_lr, **extra)
        self.sampler = torch.Generator().manual_seed(cfg.seed)
        self.noise = torch.Generator().manual_seed(cfg.seed + 1)
        self.round = 0  # index of the next round (0-based, as upstream's rnd)
        self.dl_density = self.ul_density = 1.0

    def state(self) -> dict:
        """The current global adapter (detached tensors)."""
        return {n: p.detach() for n, p in self.params.items()}

    def begin_round(self) -> tuple[float, float]:
        """Densities of this round and, where upstream does, a fresh global top-k download mask."""
        cfg, rnd = self.cfg, self.round
        self.dl_density = density_at(cfg.dl_density, cfg.dl_density_decay, rnd, cfg.decay_freq)
        self.ul_density = density_at(cfg.ul_density, cfg.ul_density_decay, rnd, cfg.decay_freq)
        if (self.dl_density < 1 and not cfg.server_freeze) or (rnd == 1 and cfg.server_freeze):
            self.mask = topk_mask(self.state(), self.dl_density)
        return self.dl_density, self.ul_density

    def masked_state(self) -> dict:
        """What clients start from: ``θ ⊙ M`` when the download is sparse, else ``θ``."""
        return apply_mask(self.state(), self.mask if self.dl_density < 1 else None)

    def download(self) -> SparsePayload:
        """The download payload: the masked-in entries of ``θ`` (or dense ``θ``)."""
        return encode(self.state(), self.mask if self.dl_density < 1 else None)

    def sample(self) -> list[int]:
        """Client ids of this round: a seeded permutation cut to ``clients_per_round`` (without replacement)."""
        return torch.randperm(self.num_clients, generator=self.sampler)[: self.cfg.clients_per_round].tolist()

    def step(self, payloads: list) -> dict:
        """Aggregate the accepted payloads (each checked first; a bad one is skipped and counted), apply DP clipping
        and noise when set, set ``p.grad = ΣΔ / n_accepted`` and step the server optimizer. Returns round stats."""
        cfg, like = self.cfg, self.state()
        aggregate, accepted, rejected, norms, errors = None, 0, 0, [], []
        for client_id, payload in payloads:
            try:
                delta, _ = decode(payload, like)
            except UpdateRejected as exc:
                rejected += 1
                errors.append(f"client {client_id}: {exc}")
                logger.warning("FLASC round %d: rejected the update of client %s: %s", self.round + 1, client_id, exc)
                continue
            norm = float(torch.linalg.vector_norm(flatten(delta)))
            norms.append(norm)
            if cfg.l2_clip_norm > 0:
                divisor = max(norm / cfg.l2_clip_norm, 1.0)
                delta = {n: d / divisor for n, d in delta.items()}
            if aggregate is None:
                aggregate = delta
            else:
                for n in aggregate:
                    aggregate[n] += delta[n]
            accepted += 1
        if aggregate is not None:
            if cfg.l2_clip_norm > 0:
                aggregate = {n: a / cfg.l2_clip_norm for n, a in aggregate.items()}
            if cfg.noise_multiplier > 0:
                aggregate = {n: a + cfg.noise_multiplier * torch.randn(a.shape, generator=self.noise)
                             for n, a in aggregate.items()}
            self.opt.zero_grad()
            for n, p in self.params.items():
                p.grad = aggregate[n] / accepted
            self.opt.step()
        else:
            logger.warning("FLASC round %d: no update accepted; the global adapter is unchanged.", self.round + 1)
        self.round += 1
        return {"accepted": accepted, "rejected": rejected, "rejections": errors,
                "delta_norm": float(np.mean(norms)) if norms else 0.0}

    def eval_state(self) -> dict:
        """The adapter evaluated after a round: ``θ ⊙ M`` (``eval_masked`` on a sparse download, upstream), else θ."""
        if self.cfg.eval_masked and self.dl_density < 1:
            return apply_mask(self.state(), self.mask)
        return self.state()

    def state_dict(self) -> dict:
        """Everything needed to resume: global adapter, mask, optimizer, RNG states, round index."""
        return {"params": self.state(), "mask": self.mask, "opt": self.opt.state_dict(),
                "sampler": self.sampler.get_state(), "noise": self.noise.get_state(), "round": self.round,
                "dl_density": self.dl_density, "ul_density": self.ul_density}

    def load_state_dict(self, state: dict) -> None:
        """Restore what ``state_dict`` saved."""
        with torch.no_grad():
            for n, p in self.params.items():
                p.copy_(state["params"][n])
        self.mask = state["mask"]
        self.opt.load_state_dict(state["opt"])
        self.sampler.set_state(state["sampler"])
        self.noise.set_state(state["noise"])
        self.round, self.dl_density, self.ul_density = state["round"], state["dl_density"], state["ul_density"]


# --------------------------------------------------------------------------------------------- in-process driver


def run_local(model, num_clients: int, client_batches: Callable[[int, int], Iterable[dict]], cfg: FlascConfig,
              evaluate: Optional[Callable[[dict], dict]] = None, server: Optional[FlascServer] = None,
              on_round: Optional[Callable[[dict, FlascServer], None]] = None) -> tuple[FlascServer, list]:
    """Run FLASC in this process with the pure functions (the same rounds the Flower strategy runs).

    ``client_batches(client_id, rnd)`` gives a client's batches for round index ``rnd``; ``evaluate(state)`` scores a
    global adapter; ``on_round(record, server)`` is called after each round (progress, checkpoints). Returns the
    server and one record per round."""
    server = server or FlascServer(trainable_state(model), cfg, num_clients)
    history = []
    while server.round < cfg.rounds:
        rnd = server.round
        _, ul = server.begin_round()
        download = server.download()
        start, mask = decode(download)
        clients = server.sample()
        uploads, losses = [], []
        for cid in clients:
            payload, stats = client_update(model, start, client_batches(cid, rnd), cfg, mask=mask, ul_density=ul,
                                           seed=client_seed(cfg.seed, rnd, cid))
            uploads.append((cid, payload))
            losses.append(stats["loss"])
        stats = server.step(uploads)
        record = round_record(rnd, server, clients, download.nbytes * len(clients),
                              sum(p.nbytes for _, p in uploads), sum(p.entries for _, p in uploads), stats, losses,
                              entries_down=download.entries * len(clients))
        if evaluate is not None:
            record.update(evaluate(server.eval_state()))
        history.append(record)
        if on_round is not None:
            on_round(record, server)
    return server, history


def trainable_state(model) -> dict:
    """A detached copy of the model's trainable parameters (the exchanged adapter state)."""
    return {n: p.detach().clone() for n, p in trainable_parameters(model).items()}


def client_seed(seed: int, rnd: int, client_id: int) -> int:
    """Seed of a client's dropout and data order in a round (the same in every engine)."""
    return (seed * 1_000_003 + rnd * 10_007 + client_id) % (2**31 - 1)


def round_record(rnd: int, server: FlascServer, clients: list, bytes_down: int, bytes_up: int, entries_up: int,
                 stats: dict, losses: list, entries_down: int = 0) -> dict:
    """One round's metrics (JSON-ready): bytes are index + value arrays; entries are values sent."""
    return {"round": rnd + 1, "dl_density": server.dl_density, "ul_density": server.ul_density,
            "clients": [int(c) for c in clients], "bytes_down": int(bytes_down), "bytes_up": int(bytes_up),
            "entries_down": int(entries_down), "entries_up": int(entries_up), "accepted": stats["accepted"],
            "rejected": stats["rejected"],
            "rejections": stats["rejections"], "delta_norm": stats["delta_norm"],
            "train_loss": float(np.mean(losses)) if losses else float("nan")}
