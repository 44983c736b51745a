"""The ClientApp's edge profile: the node's own device and thread limit, and what it
measures about itself each round (train seconds, peak memory).

:func:`node_profile` reads the profile keys of the node config
(:mod:`fl.node`); :func:`measured` wraps a train handler so that the reply's
metrics also carry ``peak-memory-mb`` (peak resident memory of the ClientApp
process while it handled the message) and, when the node config names a
``metrics-path``, the node appends one JSON line per round to that file on the
node itself. Under Ray (a simulation) the reply also names the Ray node that trained
it (``ray-node-id``), so a run on a cluster shows where its clients were placed.
"""

from __future__ import annotations

import dataclasses
import functools
import time
from collections.abc import Callable

import torch
from flwr.app import Context, Message

from fl import contract
from fl.config import ExperimentConfig
from fl.node import PARTITION_ID, PEAK_CUDA_MEMORY_MB, EdgeProfile, PeakMemory
from fl.scaleout import current_ray_node

Handler = Callable[[Message, Context], Message]

__all__ = ["measured", "node_profile"]


def node_profile(cfg: ExperimentConfig, context: Context) -> ExperimentConfig:
    """Apply this node's thread limit; return ``cfg`` with the node's device preference.

    ``cfg`` itself is not changed (it is cached and shared between handlers).
    """
    profile = EdgeProfile.from_node_config(context.node_config)
    profile.apply_threads(cfg.resources.client_cpus)
    if profile.device and profile.device != cfg.resources.device:
        cfg = dataclasses.replace(
            cfg, resources=dataclasses.replace(cfg.resources, device=profile.device))
    return cfg


def measured(handler: Handler) -> Handler:
    """Add ``peak-memory-mb`` (and under Ray ``ray-node-id``) to a train reply's metrics;
    log the round on the node."""

    @functools.wraps(handler)
    def wrapper(msg: Message, context: Context) -> Message:
        profile = EdgeProfile.from_node_config(context.node_config)
        cuda = torch.cuda.is_available() and profile.device != "cpu"
        t0 = time.perf_counter()
        with PeakMemory("cuda" if cuda else "cpu") as peak:
            reply = handler(msg, context)
        if reply.has_error() or contract.METRICS not in reply.content:
            return reply
        metrics = reply.content[contract.METRICS]
        metrics[contract.PEAK_MEMORY_MB] = peak.rss_mb
        if cuda:
            metrics[PEAK_CUDA_MEMORY_MB] = peak.cuda_mb
        if (ray_node := current_ray_node()) is not None:  # a simulation: where it ran
            metrics[contract.RAY_NODE_ID] = ray_node
        conf = msg.content[contract.CONFIG] if contract.CONFIG in msg.content else {}
        profile.record({
            "round": int(conf.get(contract.SERVER_ROUND, 0)),
            "message": msg.metadata.message_type,
            "partition-id": int(context.node_config.get(PARTITION_ID, 0)),
            contract.NUM_EXAMPLES: int(metrics.get(contract.NUM_EXAMPLES, 0)),
            contract.TRAIN_SECONDS: float(metrics.get(contract.TRAIN_SECONDS, 0.0)),
            "handler-seconds": round(time.perf_counter() - t0, 4),
            contract.PEAK_MEMORY_MB: peak.rss_mb,
            "threads": torch.get_num_threads(),
        })
        return reply

    return wrapper
