"""The round loop: configure, send, receive, aggregate, evaluate, record.

Flower's ``Strategy.start`` owns a similar loop; the platform runs its own so
that every round also measures the bytes on the wire and writes a record the
moment it ends. It calls Flower's five strategy hooks and the few that
:class:`strategies.base.BonsaiStrategy` declares beside them.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from logging import INFO, WARNING
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from fl import contract
from fl.checkpoint import Checkpoint
from fl.checkpoint import save as save_checkpoint
from fl.results import RunRecorder
from fl.scaleout import node_label
from fl.wire import message_nbytes
from server.cohorts import CohortGrid
from server.diagnostics import decompose_round
from server.guidance_check import GuidanceCheck
from strategies.base import BonsaiStrategy

EvaluateFn = Callable[[int, ArrayRecord], dict[str, float]]


class RunStopped(RuntimeError):
    """The process is shutting down (Ctrl-C, a kill): the round in progress is dropped."""


def _cut(rnd: int) -> None:
    log(WARNING, "round %d was cut by the shutdown: not recorded (the checkpoint stays at "
        "round %d)", rnd, rnd - 1)
    raise RunStopped(f"stopped during round {rnd}")


@dataclass
class _Closed:
    """A trained and aggregated round, waiting to be recorded and checkpointed: its
    server evaluation (done, or a Future still running beside the next round), what the
    strategy reported and held after it, the counters."""

    round: int
    started: float  #: time.perf_counter() when the round began
    metrics: dict[str, float] | Future[dict[str, float]]
    info: dict[str, Any]  #: strategy.round_info() after the round
    rest: dict[str, Any]  #: the record's bytes, FLOPs, clients, ...
    arrays: ArrayRecord
    state: dict[str, Any]  #: strategy.state_dict() after the round (copied if overlapped)
    counters: dict[str, int]


def _bytes(messages: Iterable[Message]) -> int:
    """Serialised size of the messages' contents: what travels on the wire."""
    seen: dict[int, int] = {}
    total = 0
    for m in messages:
        if m.has_error():
            continue
        key = id(m.content)  # the FedAvg family shares one RecordDict across messages
        if key not in seen:
            seen[key] = message_nbytes(m.content)
        total += seen[key]
    return total


def _partitions(partition_of: Callable[[int], int | None], node_ids: Iterable[int]
                ) -> list[int]:
    """Sorted partition ids of ``node_ids`` (-1 for a node the server cannot place)."""
    return sorted(-1 if (p := partition_of(n)) is None else p for n in node_ids)


def ray_nodes_of(replies: Iterable[Message]) -> list[str]:
    """The Ray nodes (fl.scaleout.node_label) that trained these replies, sorted; empty
    outside a simulation."""
    nodes = {node_label(m[contract.RAY_NODE_ID]) for r in replies
             if contract.METRICS in r.content
             and contract.RAY_NODE_ID in (m := r.content[contract.METRICS])}
    return sorted(nodes)


def run_rounds(
    grid: Grid,
    strategy: BonsaiStrategy,
    arrays: ArrayRecord,
    num_rounds: int,
    train_config: ConfigRecord,
    evaluate_fn: EvaluateFn,
    recorder: RunRecorder,
    timeout: float,
    decompose_every: int = 0,
    resume_from: Checkpoint | None = None,
    config_json: str = "",
    stopping: Callable[[], bool] = lambda: False,
    on_round_start: Callable[[int], None] | None = None,
    partition_of: Callable[[int], int | None] | None = None,
    guidance_check: GuidanceCheck | None = None,
    cohorts: CohortGrid | None = None,
    overlap: bool = False,
) -> ArrayRecord:
    """Run rounds up to ``num_rounds`` and record and checkpoint each; return the final
    global arrays. With ``resume_from``, continue after its round with its state.

    ``on_round_start(round)`` runs before each round is configured (the server
    maps nodes that came back under a new id there). With ``partition_of`` (node id
    -> partition id), each record names its ``participants`` (the partition ids of
    the clients that replied without error: the replies handed to aggregation)
    and the ``failed`` ones (sent a message, no reply or an error), sorted.

    The server's evaluation of every round (round 0: theta_0) goes to the strategy's
    ``observe_evaluation`` (a pruning schedule may wait for the loss to fall), and,
    when ``guidance_check`` is due, the guidance-quality diagnostic runs on the new
    global model (its rho fields join the record).

    ``stopping()`` turns true when the process is being shut down. A round that
    is still open then is neither recorded nor checkpointed (RunStopped is
    raised): the clients are stopped with the server, so its failed replies are
    the shutdown's, and a resumed run must redo that round, not inherit it.

    ``cohorts`` (cohort mode: the CohortGrid inside ``grid``): bytes_down/up stay
    what the per-client messages measure (what one client per message sends); each
    record adds ``workers`` and ``packed_bytes_down``/``packed_bytes_up``, what the
    training exchange's packed messages measured.

    ``overlap``: the server evaluates round r in a background thread while round
    r + 1 trains (the clients or workers would otherwise wait for it), unless the
    strategy's next round depends on that evaluation
    (``evaluation_steers_next_round``), a diagnostic is due, or r is the last
    round. Round r is then recorded and checkpointed (with the strategy's state as
    it was after round r) once round r + 1's replies are in; its ``seconds`` run
    from its start to round r + 1's. The records and checkpoints are the same as
    without overlap, apart from the seconds; a round that ended before a failure or
    shutdown is still recorded.
    """

    def packed() -> tuple[int, int]:
        return cohorts.packed_bytes() if cohorts is not None else (0, 0)

    def packed_fields(before: tuple[int, int]) -> dict[str, int]:
        if cohorts is None:
            return {}
        down, up = packed()
        return {"workers": len(cohorts.workers), "packed_bytes_down": down - before[0],
                "packed_bytes_up": up - before[1]}

    t0 = time.perf_counter()
    # what plain FedAvg would move per message: the dense model (for "bytes_saved")
    dense_msg = message_nbytes(RecordDict({contract.ARRAYS: arrays}))
    if decompose_every:
        strategy.track_client_states(True)
    if resume_from is not None:
        arrays = ArrayRecord(resume_from.arrays)
        strategy.load_state_dict(resume_from.strategy)
        c = resume_from.counters
        cum_bytes, cum_flops, cum_dense = int(c["bytes"]), int(c["flops"]), int(c["dense"])
        start = resume_from.round + 1
        log(INFO, "resuming after round %d", resume_from.round)
    else:
        before = packed()
        phase = strategy.prepare(grid, timeout)
        phase_packed = packed_fields(before)
        first = evaluate_fn(0, arrays)
        strategy.observe_evaluation(0, first["loss"], first["accuracy"])
        cum_bytes, cum_flops, cum_dense = phase.bytes_down + phase.bytes_up, phase.train_flops, 0
        recorder.add_round({"round": 0, **first, "seconds": round(time.perf_counter() - t0, 4),
                            "bytes_down": phase.bytes_down, "bytes_up": phase.bytes_up,
                            "cum_bytes": cum_bytes, "train_flops": cum_flops,
                            "cum_flops": cum_flops, "clients": phase.clients, "failures": 0,
                            **phase_packed})
        start = 1
    def close(r: _Closed, seconds: float) -> None:
        """Record and checkpoint a finished round (its evaluation done)."""
        if isinstance(r.metrics, Future):  # evaluated beside the next round
            metrics = r.metrics.result()
            strategy.observe_evaluation(r.round, metrics["loss"], metrics["accuracy"])
        else:
            metrics = r.metrics
        record = {"round": r.round, **metrics, **r.info, "seconds": round(seconds, 4),
                  **r.rest}
        recorder.add_round(record)
        save_checkpoint(recorder.dir, Checkpoint(r.round, r.arrays.to_torch_state_dict(),
                                                 r.state, r.counters, config_json))
        log(INFO, "round %d/%d: accuracy %.4f loss %.4f (%.2f s, %d B down, %d B up)",
            r.round, num_rounds, record["accuracy"], record["loss"], record["seconds"],
            r.rest["bytes_down"], r.rest["bytes_up"])

    # overlap: the server's evaluation of round r runs in this thread pool while round
    # r + 1 trains (the workers would otherwise wait for it); its record and checkpoint
    # follow when round r + 1's replies are in
    pool = ThreadPoolExecutor(1, thread_name_prefix="bonsai-eval") if overlap else None
    pending: _Closed | None = None
    try:
        for rnd in range(start, num_rounds + 1):
            if stopping():
                raise RunStopped(f"stopped before round {rnd}")
            t = time.perf_counter()
            if on_round_start is not None:
                on_round_start(rnd)
            msgs = list(strategy.configure_train(rnd, arrays, ConfigRecord(dict(train_config)),
                                                 grid))
            down = _bytes(msgs)
            before = packed()
            replies = list(grid.send_and_receive(msgs, timeout=timeout))
            if pending is not None:
                close(pending, t - pending.started)
                pending = None
            round_packed = packed_fields(before)
            up = _bytes(replies)
            failures = sum(1 for r in replies if r.has_error()) + len(msgs) - len(replies)
            new_arrays, train_metrics = strategy.aggregate_train(rnd, replies)
            if new_arrays is None:
                log(WARNING, "round %d: no usable replies; the global model is unchanged", rnd)
            else:
                arrays = new_arrays
            eval_msgs = list(strategy.configure_evaluate(rnd, arrays, ConfigRecord({}), grid))
            fed_eval: MetricRecord | None = None
            if eval_msgs:
                eval_replies = list(grid.send_and_receive(eval_msgs, timeout=timeout))
                fed_eval = strategy.aggregate_evaluate(rnd, eval_replies)
            ok = [r for r in replies if not r.has_error()]
            flops = sum(int(r.content[contract.METRICS].get(contract.TRAIN_FLOPS, 0))
                        for r in ok if contract.METRICS in r.content)
            cum_bytes += down + up
            cum_flops += flops
            cum_dense += dense_msg * (len(msgs) + len(ok))
            rest: dict[str, Any] = {
                "bytes_down": down, "bytes_up": up, "cum_bytes": cum_bytes,
                "bytes_saved": round(1.0 - cum_bytes / max(1, cum_dense), 6),
                "train_flops": flops, "cum_flops": cum_flops,
                "clients": len(ok), "failures": failures, **round_packed,
            }
            if partition_of is not None:
                replied = {r.metadata.src_node_id for r in ok}
                rest["participants"] = _partitions(partition_of, replied)
                rest["failed"] = _partitions(
                    partition_of, {m.metadata.dst_node_id for m in msgs} - replied)
            if ray_nodes := ray_nodes_of(ok):
                rest["ray_nodes"] = ray_nodes
            if train_metrics is not None and contract.TRAIN_LOSS in train_metrics:
                rest["train_loss"] = float(train_metrics[contract.TRAIN_LOSS])
            if fed_eval is not None and contract.EVAL_ACCURACY in fed_eval:
                rest["federated_accuracy"] = float(fed_eval[contract.EVAL_ACCURACY])
            counters = {"bytes": cum_bytes, "flops": cum_flops, "dense": cum_dense}
            guidance_due = guidance_check is not None and guidance_check.due(rnd)
            decompose_due = (bool(decompose_every) and rnd % decompose_every == 0
                             and new_arrays is not None)
            if (pool is not None and rnd < num_rounds and not guidance_due
                    and not decompose_due and not strategy.evaluation_steers_next_round()):
                if stopping():
                    _cut(rnd)
                pending = _Closed(rnd, t, pool.submit(evaluate_fn, rnd, arrays),
                                  strategy.round_info(), rest, arrays,
                                  copy.deepcopy(strategy.state_dict()), counters)
                continue
            metrics = evaluate_fn(rnd, arrays)
            strategy.observe_evaluation(rnd, metrics["loss"], metrics["accuracy"])
            if guidance_due:
                metrics.update(guidance_check(rnd, arrays, strategy))
            if decompose_due:
                metrics.update(decompose_round(grid, strategy.client_states(), arrays, rnd,
                                               timeout))
            info = strategy.round_info()
            if stopping():
                _cut(rnd)
            close(_Closed(rnd, t, metrics, info, rest, arrays, strategy.state_dict(), counters),
                  time.perf_counter() - t)
    finally:
        if pending is not None:  # a round that ended before a failure is kept
            try:
                close(pending, time.perf_counter() - pending.started)
            except Exception as exc:  # noqa: BLE001 - the failure in flight is what counts
                log(WARNING, "round %d could not be recorded: %s", pending.round, exc)
        if pool is not None:
            pool.shutdown(wait=True)
    log(INFO, "%d rounds in %.1f s", num_rounds, time.perf_counter() - t0)
    return arrays
