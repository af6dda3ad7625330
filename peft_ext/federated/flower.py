"""FLASC on Flower (Message API): ``FlascStrategy`` (server), ``make_client_app`` / ``make_server_app``, the
module-level ``client_app`` / ``server_app`` for ``flwr run`` (simulation or deployment), and ``simulate`` (Flower's
simulation engine on Ray, from Python).

Each round the strategy sends every sampled client the sparse download (indices + values of ``θ ⊙ M``) and the
round's settings; the ClientApp trains the dense adapter from it and replies with its sparse upload; the strategy
checks each reply against the global adapter (a mismatching one is rejected and counted, the round goes on), and
steps the server optimizer. Server and clients run the pure functions of ``peft_ext.federated.flasc``.

Clients are addressed by their ``partition-id`` (node config): at the first round the strategy asks every connected
node for it (a ``query`` message), so client sampling is the same seeded permutation as in the in-process loop.
"""

from __future__ import annotations

import logging
import time
from typing import Callable, Iterable, Optional

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import ServerApp
from flwr.serverapp.strategy import Strategy

from .flasc import FlascServer, SparsePayload, UpdateRejected, client_seed, client_update, decode, round_record

logger = logging.getLogger(__name__)

DOWN, UP, SHAPES, SETTINGS, STATS = "flasc.down", "flasc.up", "flasc.shapes", "flasc.settings", "flasc.stats"


def payload_to_records(payload: SparsePayload) -> dict:
    """A payload as Flower records: an ArrayRecord of ``<name>|v`` values and ``<name>|i`` indices, and a
    ConfigRecord of shapes (``<name>`` → list of ints)."""

    arrays = {}
    for name, values in payload.values.items():
        arrays[f"{name}|v"] = Array(np.ascontiguousarray(values))
        if payload.indices.get(name) is not None:
            arrays[f"{name}|i"] = Array(np.ascontiguousarray(payload.indices[name]))
    shapes = ConfigRecord({name: [int(s) for s in shape] for name, shape in payload.shapes.items()})
    return {"arrays": ArrayRecord(arrays, keep_input=True), "shapes": shapes}


def records_to_payload(arrays, shapes) -> SparsePayload:
    """The inverse of ``payload_to_records``; a malformed record raises ``UpdateRejected``."""
    if arrays is None or shapes is None:
        raise UpdateRejected("the reply carries no adapter update (missing 'flasc.up' or 'flasc.shapes').")
    values, indices = {}, {}
    for key in arrays.keys():
        name, _, kind = key.rpartition("|")
        if kind not in ("v", "i") or not name:
            raise UpdateRejected(f"unexpected array {key!r} in the update.")
        (values if kind == "v" else indices)[name] = arrays[key].numpy()
    names = set(shapes.keys())
    if set(values) != names or not set(indices) <= names:
        raise UpdateRejected(f"the update's arrays and shapes name different tensors: "
                             f"{sorted(names ^ set(values))[:5]}.")
    return SparsePayload({n: list(shapes[n]) for n in shapes.keys()}, {n: indices.get(n) for n in values}, values)


class FlascStrategy(Strategy):
    """A Flower ``Strategy`` (Message API) running FLASC rounds with a ``FlascServer``.

    ``evaluate(server)`` gives the metrics of the new global adapter (e.g. central accuracy) and ``on_round(record,
    server)`` receives each round's record (progress, checkpoints); ``history`` collects the records.
    """

    def __init__(self, server: FlascServer, evaluate: Optional[Callable] = None, on_round: Optional[Callable] = None,
                 wait_s: float = 600.0):
        self.server, self.evaluate, self.on_round, self.wait_s = server, evaluate, on_round, wait_s
        self.node_of: dict = {}
        self.history: list = []
        self._round: dict = {}

    # -- node discovery: partition-id → node id
    def _discover(self, grid) -> None:

        need, deadline = self.server.num_clients, time.time() + self.wait_s
        while len(nodes := list(grid.get_node_ids())) < need:
            if time.time() > deadline:
                raise RuntimeError(f"FLASC: only {len(nodes)} of {need} client nodes connected in {self.wait_s}s.")
            time.sleep(0.2)
        replies = grid.send_and_receive(
            [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes])
        for reply in replies:
            if reply.has_error():
                continue
            pid = int(reply.content.metric_records["flasc.node"]["partition-id"])
            self.node_of[pid] = reply.metadata.src_node_id
        missing = sorted(set(range(need)) - set(self.node_of))
        if missing:
            raise RuntimeError(f"FLASC: no node reports partition-id {missing[:10]} (nodes need node-config "
                               f"partition-id in 0..{need - 1}).")

    def configure_train(self, server_round: int, arrays, config, grid) -> Iterable:
        """Sample clients, build the sparse download and one message per client."""

        if not self.node_of:
            self._discover(grid)
        srv = self.server
        _, ul = srv.begin_round()
        payload = srv.download()
        records = payload_to_records(payload)
        clients = srv.sample()
        self._round = {"rnd": srv.round, "clients": clients, "bytes_down": payload.nbytes * len(clients),
                       "entries_down": payload.entries * len(clients),
                       "client_of": {self.node_of[c]: c for c in clients}}
        messages = []
        for cid in clients:
            settings = ConfigRecord({"round": srv.round, "client": cid, "ul_density": ul,
                                     "seed": client_seed(srv.cfg.seed, srv.round, cid)})
            content = RecordDict({DOWN: records["arrays"], SHAPES: records["shapes"], SETTINGS: settings})
            messages.append(Message(content, dst_node_id=self.node_of[cid], message_type=MessageType.TRAIN))
        return messages

    def aggregate_train(self, server_round: int, replies: Iterable):
        """Check and aggregate the replies (bad ones rejected and counted), step the server, evaluate."""

        uploads, losses, failed = [], [], []
        for reply in replies:
            cid = self._round["client_of"].get(reply.metadata.src_node_id, reply.metadata.src_node_id)
            if reply.has_error():
                failed.append(f"client {cid}: {reply.error.reason}")
                logger.warning("FLASC: client %s failed: %s", cid, reply.error.reason)
                continue
            content = reply.content
            try:
                payload = records_to_payload(content.array_records.get(UP), content.config_records.get(SHAPES))
            except UpdateRejected as exc:
                failed.append(f"client {cid}: {exc}")
                logger.warning("FLASC: rejected the update of client %s: %s", cid, exc)
                continue
            uploads.append((cid, payload))
            stats = content.metric_records.get(STATS)
            if stats is not None:
                losses.append(float(stats["loss"]))
        stats = self.server.step(uploads)
        stats["rejected"] += len(failed)
        stats["rejections"] = failed + stats["rejections"]
        record = round_record(self._round["rnd"], self.server, self._round["clients"], self._round["bytes_down"],
                              sum(p.nbytes for _, p in uploads), sum(p.entries for _, p in uploads), stats, losses,
                              entries_down=self._round["entries_down"])
        if self.evaluate is not None:
            record.update(self.evaluate(self.server))
        self.history.append(record)
        if self.on_round is not None:
            self.on_round(record, self.server)
        metrics = {k: record[k] for k in ("bytes_up", "bytes_down", "accepted", "rejected", "train_loss")}
        metrics.update({k: v for k, v in record.items() if k in ("accuracy", "eval_loss")})
        state = {n: Array(t.numpy().copy()) for n, t in self.server.state().items()}
        return ArrayRecord(state), MetricRecord({k: float(v) for k, v in metrics.items()})

    def configure_evaluate(self, server_round: int, arrays, config, grid) -> Iterable:
        """No federated evaluation: the server evaluates the global adapter centrally (``evaluate``)."""
        return []

    def aggregate_evaluate(self, server_round: int, replies: Iterable):
        """Nothing to aggregate (see ``configure_evaluate``)."""
        return None

    def summary(self) -> None:
        """Log the FLASC settings."""
        cfg = self.server.cfg
        logger.info("FLASC: %d clients, %d per round, d_dl=%s d_ul=%s, server %s lr=%s", self.server.num_clients,
                    cfg.clients_per_round, cfg.dl_density, cfg.ul_density, cfg.server_opt, cfg.server_lr)

    def run(self, grid, num_rounds: int, timeout: float = 3600):
        """Run ``num_rounds`` rounds through Flower's ``Strategy.start`` loop (initial arrays: the global adapter)."""
        initial = ArrayRecord({n: Array(t.numpy().copy()) for n, t in self.server.state().items()})
        return self.start(grid, initial, num_rounds=num_rounds, timeout=timeout)


# --------------------------------------------------------------------------------------------------- client side


def _client_train(message, context, recipe):
    """The ClientApp's train handler: decode the download, train, reply with the sparse upload."""
    import torch

    from .flasc import trainable_state
    from .recipe import get_task

    torch.set_num_threads(1)
    task = get_task(recipe)
    pid = int(context.node_config["partition-id"])
    settings = message.content.config_records[SETTINGS]
    if int(settings["client"]) != pid:
        raise RuntimeError(f"FLASC: message for client {settings['client']} reached partition {pid}.")
    down = records_to_payload(message.content.array_records[DOWN], message.content.config_records[SHAPES])
    start, mask = decode(down, like=trainable_state(task.model))
    rnd = int(settings["round"])
    payload, stats = client_update(task.model, start, task.client_batches(pid, rnd), task.cfg, mask=mask,
                                   ul_density=float(settings["ul_density"]), seed=int(settings["seed"]))
    records = payload_to_records(payload)
    content = RecordDict({UP: records["arrays"], SHAPES: records["shapes"],
                          STATS: MetricRecord({k: float(v) for k, v in stats.items()})})
    return Message(content, reply_to=message)


def _client_query(message, context):

    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"flasc.node": MetricRecord({"partition-id": pid})}), reply_to=message)


def make_client_app(recipe: Optional[dict] = None):
    """A ``ClientApp`` for ``recipe`` (a mapping); with ``None`` it reads the recipe path from the run config key
    ``recipe`` (``flwr run``). The node's data partition is ``node_config['partition-id']``."""

    app = ClientApp()

    @app.train()
    def train(message, context):
        return _client_train(message, context, recipe if recipe is not None else str(context.run_config["recipe"]))

    @app.query()
    def query(message, context):
        return _client_query(message, context)

    return app


# --------------------------------------------------------------------------------------------------- server side


def make_server_app(recipe=None, server: Optional[FlascServer] = None, on_round: Optional[Callable] = None,
                    evaluate: Optional[Callable] = None, result: Optional[dict] = None):
    """A ``ServerApp`` running FLASC for ``recipe`` (mapping or ``FederatedRecipe``; ``None``: the run config's
    ``recipe`` path, as the recipe runner would run it, writing into its ``output_dir``). ``server`` (a restored
    ``FlascServer``), ``on_round`` and ``evaluate`` as in ``FlascStrategy``; ``result['strategy']`` receives the
    strategy."""

    app = ServerApp()

    @app.main()
    def main(grid, context):
        from .recipe import RoundRecorder, get_task, load_federated_recipe

        spec = load_federated_recipe(recipe if recipe is not None else str(context.run_config["recipe"]))
        srv, hook, score = server, on_round, evaluate
        if srv is None:
            task = get_task(spec)
            srv = FlascServer(task.initial_state, spec.flasc, spec.data.num_clients)
            if hook is None:
                recorder = RoundRecorder(spec, task, quiet=False)
                hook, score = recorder, recorder.evaluate
        strategy = FlascStrategy(srv, evaluate=score, on_round=hook)
        if result is not None:
            result["strategy"] = strategy
        strategy.run(grid, num_rounds=spec.flasc.rounds - srv.round)

    return app


def simulate(recipe, server: Optional[FlascServer] = None, on_round: Optional[Callable] = None,
             evaluate: Optional[Callable] = None, verbose: bool = False) -> FlascStrategy:
    """Run ``recipe`` on Flower's simulation engine (Ray): one supernode per client, ``partition-id`` = client id.
    Returns the strategy (``.server`` holds the final global adapter, ``.history`` the rounds)."""
    from flwr.simulation import run_simulation

    from .recipe import load_federated_recipe, recipe_to_dict

    spec = load_federated_recipe(recipe)
    spec_dict = recipe_to_dict(spec)
    result: dict = {}
    init_args = {"include_dashboard": False, "log_to_driver": verbose}
    if spec.engine.ray_cpus is not None:
        init_args["num_cpus"] = spec.engine.ray_cpus
    backend = {"client_resources": {"num_cpus": spec.engine.client_cpus, "num_gpus": 0.0}, "init_args": init_args}
    run_simulation(server_app=make_server_app(spec_dict, server=server, on_round=on_round, evaluate=evaluate,
                                              result=result),
                   client_app=make_client_app(spec_dict), num_supernodes=spec.data.num_clients,
                   backend_config=backend, verbose_logging=verbose)
    if "strategy" not in result:
        raise RuntimeError("FLASC: the Flower simulation ended before the strategy started (see the log above).")
    return result["strategy"]


def __getattr__(name):  # ``client_app`` / ``server_app`` for `flwr run` are built on first access
    if name == "client_app":
        return make_client_app()
    if name == "server_app":
        return make_server_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
