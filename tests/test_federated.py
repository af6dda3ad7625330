"""FLASC / CELLM (peft_ext.federated): the pure functions against a hand-written reference of the official
``fl_train`` (imkevinkuo/flasc, train_sparse_lora_dp.py), density 1 against dense FedOpt, payload sizes, bad client
updates, a 2-client Flower simulation (Ray) against the pure functions, and the recipe runner."""

from __future__ import annotations

import copy
import json
import types

import pytest
import torch
from torch import nn

from conftest import call_kwargs, make_config, method_params, tiny_mlp
from peft_ext.federated import (
    FlascConfig,
    FlascServer,
    UpdateRejected,
    client_update,
    decode,
    density_at,
    dirichlet_split,
    encode,
    run_federated_recipe,
    run_local,
    topk_mask,
)
from peft_ext.federated.flasc import trainable_state
from peft_ext.recipe import RecipeError

N_CLIENTS = 4


class Classifier(nn.Module):
    """The conftest MLP with a cross-entropy loss: ``forward(x, labels)`` returns ``.loss`` like HF models."""

    def __init__(self, seed: int = 0):
        super().__init__()
        self.net = tiny_mlp(seed)

    def forward(self, x, labels=None, **_):
        logits = self.net(x)
        return types.SimpleNamespace(logits=logits, loss=nn.functional.cross_entropy(logits, labels))


def lora_model(seed: int = 0, config=None):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    return get_peft_model(Classifier(seed), config or LoraConfig(r=4, lora_alpha=8, target_modules=["lin0", "lin1"]))


def client_data(n_clients: int = N_CLIENTS, batches: int = 2, size: int = 6, seed: int = 7):
    """Fixed batches per client (a different label skew per client: non-IID)."""
    gen = torch.Generator().manual_seed(seed)
    data = []
    for c in range(n_clients):
        rows = []
        for _ in range(batches):
            x = torch.randn(size, 64, generator=gen) + c
            rows.append({"x": x, "labels": (x[:, c % 4] > c).long() + 2 * (c % 2)})
        data.append(rows)
    return data


# ------------------------------------------------------------------------------------ official algorithm, by hand


def official_topk_mask(x, density):
    """upstream get_topk_mask: k = int(numel·density) largest of a flat tensor."""
    mask = torch.zeros_like(x).bool()
    _, keep = torch.topk(x, k=int(x.numel() * density))
    mask[keep] = 1
    return mask


def official_fl_train(server_model, data, cfg: FlascConfig):
    """A transcription of upstream fl_train's arithmetic (no logging, no eval), with our client sampling and noise
    generators: ``torch.randperm(n, generator)`` and ``torch.randn(..., generator)`` seeded as FlascServer does."""
    sampler = torch.Generator().manual_seed(cfg.seed)
    noise = torch.Generator().manual_seed(cfg.seed + 1)
    server_params = {n: p for n, p in server_model.named_parameters() if p.requires_grad}
    server_mask = {n: torch.ones_like(p) for n, p in server_params.items()}
    if cfg.server_opt == "sgd":
        opt = torch.optim.SGD(server_params.values(), lr=cfg.server_lr)
    else:
        opt = torch.optim.AdamW(server_params.values(), lr=cfg.server_lr, weight_decay=cfg.server_weight_decay)
    for rnd in range(cfg.rounds):
        dl = cfg.dl_density * cfg.dl_density_decay ** (rnd // cfg.decay_freq)
        ul = cfg.ul_density * cfg.ul_density_decay ** (rnd // cfg.decay_freq)
        if (dl < 1 and not cfg.server_freeze) or (rnd == 1 and cfg.server_freeze):
            flat = torch.cat([p.flatten() for p in server_params.values()])
            mflat = official_topk_mask(flat.abs(), dl)
            cur = 0
            for n, m in server_mask.items():
                server_mask[n] = mflat[cur:cur + m.numel()].reshape(m.shape)
                cur += m.numel()
        aggregate = None
        ids = torch.randperm(len(data), generator=sampler)[: cfg.clients_per_round]
        for cid in ids.tolist():
            client = copy.deepcopy(server_model)
            if dl < 1:
                for n, p in client.named_parameters():
                    if p.requires_grad:
                        p.data = p.data * server_mask[n]
            copt = torch.optim.SGD(client.parameters(), lr=cfg.client_lr, momentum=cfg.client_momentum)
            for _ in range(cfg.client_epochs):
                for batch in data[cid]:
                    loss = client(**batch).loss
                    copt.zero_grad()
                    loss.backward()
                    if cfg.client_freeze:
                        for n, p in client.named_parameters():
                            if p.requires_grad:
                                p.grad *= server_mask[n]
                    copt.step()
            if dl < 1:
                delta = {n: server_params[n].data * server_mask[n] - p.data
                         for n, p in client.named_parameters() if p.requires_grad}
            else:
                delta = {n: server_params[n].data - p.data for n, p in client.named_parameters() if p.requires_grad}
            if ul < 1:
                dflat = torch.cat([p.flatten() for p in delta.values()])
                mflat = official_topk_mask(dflat.abs(), ul)
                cur = 0
                for n, p in delta.items():
                    p *= mflat[cur:cur + p.numel()].reshape(p.shape)
                    cur += p.numel()
            norm = torch.linalg.vector_norm(torch.cat([d.flatten() for d in delta.values()])).item()
            if cfg.l2_clip_norm > 0:
                div = max(norm / cfg.l2_clip_norm, 1.0)
                for p in delta.values():
                    p /= div
            if aggregate is None:
                aggregate = delta
            else:
                for n, d in delta.items():
                    aggregate[n] += d
        if cfg.l2_clip_norm > 0:
            for p in aggregate.values():
                p /= cfg.l2_clip_norm
        if cfg.noise_multiplier > 0:
            for p in aggregate.values():
                p += cfg.noise_multiplier * torch.randn(*p.shape, generator=noise)
        opt.zero_grad()
        for n, sp in server_params.items():
            sp.grad = aggregate[n] / cfg.clients_per_round
        opt.step()
    return {n: p.detach() for n, p in server_params.items()}


def pure_run(cfg: FlascConfig, data, model=None):
    model = model or lora_model()
    server, history = run_local(model, len(data), lambda cid, rnd: data[cid], cfg)
    return server.state(), history


def assert_states_equal(a: dict, b: dict):
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), (name, (a[name] - b[name]).abs().max())


# ------------------------------------------------------------------------------------------------------- the tests


@pytest.mark.parametrize("variant", ["plain", "freeze_dp_sgd"])
def test_parity_with_official_fl_train(one_thread, variant):
    """4 clients, 3 rounds, density 0.25: the same global adapter, bit for bit, as the transcribed fl_train (both
    run the same float ops in the same order, so exact equality is expected)."""
    extra = {} if variant == "plain" else dict(server_freeze=True, client_freeze=True, l2_clip_norm=0.05,
                                               noise_multiplier=0.01, server_opt="sgd", server_lr=0.5,
                                               ul_density_decay=0.5)
    cfg = FlascConfig(**{**dict(rounds=3, clients_per_round=3, dl_density=0.25, ul_density=0.25, client_lr=0.05,
                                server_lr=0.01, seed=3), **extra})
    data = client_data()
    ours, history = pure_run(cfg, data)
    ref = official_fl_train(lora_model(), data, cfg)
    assert_states_equal(ours, ref)
    assert [r["accepted"] for r in history] == [3, 3, 3]
    assert len({tuple(r["clients"]) for r in history}) > 1  # the seeded sampling really varies between rounds


@pytest.mark.parametrize("server_opt,server_lr", [("sgd", 1.0), ("adamw", 0.01)])
def test_density_one_is_dense_fedopt(one_thread, server_opt, server_lr):
    """Densities 1.0 are FedAvg (SGD, lr 1) / FedAdam exactly: a plain dense FedOpt loop gives identical tensors."""
    cfg = FlascConfig(rounds=2, clients_per_round=2, client_lr=0.05, server_opt=server_opt, server_lr=server_lr)
    data = client_data()
    ours, history = pure_run(cfg, data)
    model = lora_model()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    opt = (torch.optim.SGD(params.values(), lr=server_lr) if server_opt == "sgd"
           else torch.optim.AdamW(params.values(), lr=server_lr, weight_decay=0.01))
    sampler = torch.Generator().manual_seed(cfg.seed)
    for _ in range(cfg.rounds):
        deltas = []
        for cid in torch.randperm(N_CLIENTS, generator=sampler)[:2].tolist():
            local = copy.deepcopy(model)
            lopt = torch.optim.SGD([p for p in local.parameters() if p.requires_grad], lr=0.05, momentum=0.9)
            for batch in data[cid]:
                lopt.zero_grad()
                local(**batch).loss.backward()
                lopt.step()
            lp = dict(local.named_parameters())
            deltas.append({n: params[n].detach() - lp[n].detach() for n in params})
        for n, p in params.items():
            p.grad = (deltas[0][n] + deltas[1][n]) / 2
        opt.step()
    assert_states_equal(ours, {n: p.detach() for n, p in params.items()})
    numel = sum(t.numel() for t in ours.values())
    assert all(r["bytes_up"] == 2 * 4 * numel for r in history)  # dense: float32 values only, no indices


@pytest.mark.parametrize("density", [0.1, 0.25, 0.5, 0.999])
def test_entries_sent_equal_int_numel_times_density(one_thread, density):
    """Download and upload payloads carry exactly int(numel × density) entries (4-byte index + 4-byte value each),
    also with ties (lora_B starts at zero)."""
    model = lora_model()
    state = trainable_state(model)
    numel = sum(t.numel() for t in state.values())
    down = encode(state, topk_mask(state, density))
    assert down.entries == int(numel * density)
    assert down.nbytes == 8 * int(numel * density)
    restored, mask = decode(down, like=state)
    assert int(sum(m.sum() for m in mask.values())) == int(numel * density)
    for n in state:
        assert torch.equal(restored[n], state[n] * mask[n])
    cfg = FlascConfig(client_lr=0.05)
    up, _ = client_update(model, state, client_data(1)[0], cfg, ul_density=density)
    assert up.entries == int(numel * density)


def test_density_schedule():
    assert [density_at(0.5, 0.5, r, 2) for r in range(5)] == [0.5, 0.5, 0.25, 0.25, 0.125]
    assert density_at(0.25, 1.0, 99, 1) == 0.25


@pytest.mark.parametrize("field,value", [("dl_density", 0.0), ("dl_density", 1.5), ("ul_density", -0.1),
                                         ("ul_density", float("nan")), ("dl_density_decay", 0.0)])
def test_density_outside_unit_interval_refused(field, value):
    with pytest.raises(ValueError, match=field):
        FlascConfig(**{field: value})
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        topk_mask({"a": torch.ones(4)}, 0.0)
    with pytest.raises(RecipeError, match=field):
        run_federated_recipe({"model": {"name": "tiny-bert"}, "data": {"source": "toy_sentiment"},
                              "flasc": {field: value}}, quiet=True)


def _bad_payloads(server: FlascServer, good):
    state = server.state()
    name = next(iter(state))
    extra = copy.deepcopy(good)
    extra.shapes["not_an_adapter.weight"] = [2]
    extra.values["not_an_adapter.weight"] = extra.values[name][:2].copy()
    extra.indices["not_an_adapter.weight"] = None
    wrong_shape = encode({n: (t[:, :2] if n == name else t) for n, t in state.items()})
    return extra, wrong_shape


def test_bad_client_update_is_rejected_and_round_goes_on(one_thread):
    """A client update with other keys or shapes is rejected with a clear error and counted; the accepted ones give
    the same step as a round with only them."""
    cfg = FlascConfig(rounds=1, clients_per_round=3, dl_density=0.5, ul_density=0.5, client_lr=0.05)
    model, data = lora_model(), client_data()
    server = FlascServer(trainable_state(model), cfg, N_CLIENTS)
    twin = FlascServer(trainable_state(model), cfg, N_CLIENTS)
    for srv in (server, twin):
        srv.begin_round()
    start, mask = decode(server.download())
    good, _ = client_update(model, start, data[0], cfg, mask=mask, ul_density=0.5)
    extra, wrong_shape = _bad_payloads(server, good)
    with pytest.raises(UpdateRejected, match="unexpected.*not_an_adapter"):
        decode(extra, like=server.state())
    with pytest.raises(UpdateRejected, match="shape"):
        decode(wrong_shape, like=server.state())
    stats = server.step([(0, good), (1, extra), (2, wrong_shape)])
    assert (stats["accepted"], stats["rejected"]) == (1, 2)
    assert "client 1" in stats["rejections"][0] and "client 2" in stats["rejections"][1]
    twin.step([(0, good)])
    assert_states_equal(server.state(), twin.state())


def test_flower_strategy_rejects_bad_replies(one_thread, monkeypatch):
    """The Flower strategy's aggregate_train: a reply with other keys, one with other shapes and an error reply are
    rejected and counted; the good reply is applied as by the pure server."""
    from flwr.app import Error, Message, MessageType, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    for attr in ("_run_id", "_task_id", "_node_id"):  # what a ServerApp process has set when it builds messages
        monkeypatch.setattr(TaskIdentity, attr, 1)

    from peft_ext.federated.flower import SHAPES, UP, FlascStrategy, payload_to_records

    cfg = FlascConfig(rounds=1, clients_per_round=4, client_lr=0.05)
    model, data = lora_model(), client_data()
    strategy = FlascStrategy(FlascServer(trainable_state(model), cfg, N_CLIENTS))
    twin = FlascServer(trainable_state(model), cfg, N_CLIENTS)
    strategy.node_of = {c: 100 + c for c in range(N_CLIENTS)}
    messages = list(strategy.configure_train(1, None, None, grid=None))
    assert sorted(m.metadata.dst_node_id for m in messages) == [100, 101, 102, 103]
    twin.begin_round()
    good, _ = client_update(model, twin.state(), data[0], cfg)
    extra, wrong_shape = _bad_payloads(twin, good)

    def reply(msg, payload):
        records = payload_to_records(payload)
        return Message(RecordDict({UP: records["arrays"], SHAPES: records["shapes"]}), reply_to=msg)

    replies = [reply(messages[0], good), reply(messages[1], extra), reply(messages[2], wrong_shape),
               Message(Error(code=0, reason="client crashed"), reply_to=messages[3])]
    arrays, metrics = strategy.aggregate_train(1, replies)
    record = strategy.history[-1]
    assert (record["accepted"], record["rejected"]) == (1, 3)
    assert metrics["rejected"] == 3.0
    assert any("not_an_adapter" in r for r in record["rejections"]) and any("shape" in r for r in record["rejections"])
    twin.step([(0, good)])
    assert_states_equal(strategy.server.state(), twin.state())
    assert torch.equal(torch.from_numpy(arrays[next(iter(twin.state()))].numpy()), next(iter(twin.state().values())))
    assert messages[0].content.config_records["flasc.settings"]["client"] in range(N_CLIENTS)
    assert MessageType.TRAIN == messages[0].metadata.message_type


@pytest.mark.parametrize("spec", method_params(lambda s: s.example_call is None))
def test_every_tuner_federates(one_thread, spec):
    """Any registered tuner: its trainable state is what travels, one sparse round changes it, and the upload holds
    int(numel × 0.5) entries per client."""
    from peft import get_peft_model

    torch.manual_seed(0)
    base = Classifier()
    model = get_peft_model(base, make_config(spec, ["lin0", "lin1"]))
    assert call_kwargs(spec, (6, 64)) == {}
    cfg = FlascConfig(rounds=1, clients_per_round=2, dl_density=0.5, ul_density=0.5, client_lr=0.05)
    before = trainable_state(model)
    assert before, f"{spec.name}: no trainable parameters"
    server, history = run_local(model, 2, lambda cid, rnd: client_data(2, batches=1)[cid], cfg)
    numel = sum(t.numel() for t in before.values())
    assert history[0]["entries_up"] == 2 * int(numel * 0.5)
    assert server.state().keys() == before.keys()
    assert any(not torch.equal(server.state()[n], before[n]) for n in before), spec.name


def test_dirichlet_split_is_seeded_and_complete():
    labels = [0] * 60 + [1] * 40
    a = dirichlet_split(labels, 5, 0.3, seed=1, min_size=3)
    b = dirichlet_split(labels, 5, 0.3, seed=1, min_size=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert sorted(int(i) for part in a for i in part) == list(range(100))
    assert min(len(p) for p in a) >= 3
    c = dirichlet_split(labels, 5, 0.3, seed=2, min_size=3)
    assert any(len(x) != len(y) or (x != y).any() for x, y in zip(a, c))


TINY = {
    "name": "t", "seed": 0, "model": {"name": "tiny-bert", "task": "seq_cls", "num_labels": 2},
    "method": {"name": "lora", "config": {"r": 4, "lora_alpha": 8, "target_modules": ["query", "value"]}},
    "data": {"source": "toy_sentiment", "num_clients": 2, "dirichlet_alpha": 1.0, "max_length": 16},
    "flasc": {"rounds": 2, "clients_per_round": 2, "client_lr": 0.05, "server_lr": 0.01, "dl_density": 0.25,
              "ul_density": 0.25},
    "evaluation": {"plot": False, "save_adapter": False},
}


@pytest.mark.slow  # Ray start-up dominates: ~70 s wall at load 11 on the shared 2-core machine (~11 min at load 14+)
def test_flower_simulation_matches_pure_functions(one_thread):
    """Two supernodes on Flower's Ray simulation engine give the same global adapter, bit for bit, as the in-process
    pure functions under the same seeds (each side runs the same ops on one thread), and the same bytes."""
    from peft_ext.federated.flower import simulate
    from peft_ext.federated.recipe import get_task, load_federated_recipe

    spec = load_federated_recipe({**TINY, "engine": {"name": "flower", "ray_cpus": 1, "client_cpus": 1}})
    strategy = simulate(spec)
    task = get_task(spec)
    server, history = run_local(task.model, 2, task.client_batches, spec.flasc,
                                server=FlascServer(task.initial_state, spec.flasc, 2))
    assert_states_equal(strategy.server.state(), server.state())
    assert not all(torch.equal(server.state()[n], task.initial_state[n]) for n in task.initial_state)
    keys = ("clients", "bytes_up", "bytes_down", "entries_up", "entries_down", "accepted", "rejected")
    assert [{k: r[k] for k in keys} for r in strategy.history] == [{k: r[k] for k in keys} for r in history]


def test_recipe_writes_metrics_and_resumes(tmp_path, one_thread):
    """The recipe runner writes metrics.json (accuracy, bytes per round), the plot and the adapter; a 2-round run
    resumed to 3 rounds equals a straight 3-round run."""
    straight = {**TINY, "output_dir": str(tmp_path / "a"), "flasc": {**TINY["flasc"], "rounds": 3},
                "engine": {"name": "local"}, "evaluation": {"plot": True, "save_adapter": True}}
    m = run_federated_recipe(straight, quiet=True)
    saved = json.loads((tmp_path / "a" / "metrics.json").read_text())
    assert [r["round"] for r in saved["rounds"]] == [1, 2, 3]
    assert all(0 <= r["accuracy"] <= 1 and r["bytes_up"] > 0 and r["bytes_down"] > 0 for r in saved["rounds"])
    assert saved["total_bytes_up"] == sum(r["bytes_up"] for r in saved["rounds"])
    assert (tmp_path / "a" / "accuracy_vs_bytes.png").stat().st_size > 0
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    part = {**straight, "output_dir": str(tmp_path / "b"), "flasc": {**TINY["flasc"], "rounds": 2},
            "evaluation": {"plot": False, "save_adapter": False}}
    run_federated_recipe(part, quiet=True)
    resumed = run_federated_recipe({**part, "flasc": {**TINY["flasc"], "rounds": 3}}, resume=True, quiet=True)
    assert [r["round"] for r in resumed["rounds"]] == [1, 2, 3]
    assert resumed["final_accuracy"] == m["final_accuracy"]
    a = torch.load(tmp_path / "a" / "checkpoint.pt", weights_only=False)["server"]["params"]
    b = torch.load(tmp_path / "b" / "checkpoint.pt", weights_only=False)["server"]["params"]
    assert_states_equal(a, b)


@pytest.mark.parametrize("patch,field", [({"flasc": {"clients_per_round": 5}}, "clients_per_round"),
                                         ({"data": {"source": "toy_sentiment", "colour": 1}}, "data.colour"),
                                         ({"data": {"source": "vader", "domains": ["poems"]}}, "data.domains"),
                                         ({"model": {"name": "tiny-bert", "task": "causal_lm"}}, "model.task"),
                                         ({"method": {"name": "lora", "config": {"rank": 4}}}, "method.config.rank")])
def test_bad_recipe_names_the_field(patch, field):
    with pytest.raises(RecipeError, match=field.replace(".", r"\.")):
        run_federated_recipe({**TINY, **patch}, quiet=True)
