"""Where a simulation's Ray runs: a private Ray on this machine (all of it, or a share
when a sweep runs several cells at once), or an existing Ray cluster it joins.

Ray is the distributed engine (docs/ARCHITECTURE.md, "Scale-out"); Bonsai writes no
scheduler of its own. Flower's Ray backend calls ``ray.init()`` with no address, so a
simulation joins a cluster when ``RAY_ADDRESS`` is in the environment of the SuperLink
that starts it (:meth:`RayTarget.environment`). A private Ray's size is Flower's
``init-args-num-cpus`` / ``init-args-num-gpus`` simulation settings
(:meth:`RayTarget.federation`); Ray refuses those when it joins a cluster.

One simulation at a time per cluster (:data:`PARALLEL_ON_CLUSTER`): Flower 1.42 sizes
each simulation's actor pool to the cluster's total resources
(``flwr.simulation.ray_transport.ray_actor.pool_size_from_resources``) and hands
messages to actors Ray has not placed yet, so two simulations on one cluster each
ask for all of it: one waits for the other to end, or, when each got part of it,
both wait on each other's actors until the round timeout. Scaling the client
resources does not help (the pool shrinks by the same factor and still asks for
every CPU) and Flower's simulation config has no pool size.

The ClientApp records which Ray node trained a reply (:func:`current_ray_node`, the
``ray-node-id`` metric of fl/contract.py); a MetricRecord holds numbers only, so
the node id travels as the integer of its first :data:`NODE_DIGITS` hex digits and
the round records show it as those digits (:func:`node_label`).
"""

from __future__ import annotations

import glob
import math
import os
import re
import socket
import sys
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

__all__ = ["NODE_DIGITS", "PARALLEL_ON_CLUSTER", "RAY_ADDRESS_ENV", "RayTarget",
           "address_problem", "current_ray_node", "local_shares", "machine_resources",
           "node_label", "node_number", "reachable_problem", "resolve_address"]

RAY_ADDRESS_ENV = "RAY_ADDRESS"
CUDA_ENV = "CUDA_VISIBLE_DEVICES"
#: hex digits of a Ray node id (56 in Ray 2.x) kept in the metric: 56 bits fit an int64
NODE_DIGITS = 14
_HOST_PORT = re.compile(r"^(?P<host>[A-Za-z0-9][A-Za-z0-9.-]*|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+)$")
#: RAY_ADDRESS values with which Ray starts a new local instance instead of joining
_LOCAL = {"", "local"}
#: why ``bonsai sweep --parallel N`` refuses N > 1 with a cluster (the module docstring)
PARALLEL_ON_CLUSTER = ("allowed: 1 with a Ray cluster (Flower sizes each simulation's actor "
                       "pool to the whole cluster, so cells sharing one wait on each other's "
                       "actors); the cluster already trains each cell's clients in parallel")

# --- the place of one simulation ---------------------------------------------------------


@dataclass(frozen=True)
class RayTarget:
    """Where one simulation's Ray runs.

    ``address`` None: a private Ray on this machine, started by the simulation and
    ended with it; ``num_cpus`` / ``num_gpus`` (None: all the machine has) limit it and
    ``cuda_devices`` (None: unchanged) names the cards it sees. ``address`` set: the
    simulation joins that cluster and ends only its own driver, whose actors Ray ends
    with it.
    """

    address: str | None = None
    num_cpus: int | None = None
    num_gpus: int | None = None
    cuda_devices: str | None = None

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> RayTarget:
        """The cluster ``RAY_ADDRESS`` names, else a private Ray."""
        return cls(address=resolve_address(None, environ)[0])

    @property
    def joins_cluster(self) -> bool:
        return self.address is not None

    def federation(self, fed: Mapping[str, Any]) -> dict[str, Any]:
        """Flower's federation settings (fl.simulation.federation_config) for this place:
        a private Ray's size (``init-args-num-*``, never less than one client needs);
        unchanged on a cluster (Ray refuses a size for a driver that joins one)."""
        out = dict(fed)
        if self.address is None:
            if self.num_cpus is not None:
                need = math.ceil(float(out.get("client-resources-num-cpus", 1)))
                out["init-args-num-cpus"] = max(self.num_cpus, need)
            if self.num_gpus is not None:
                out["init-args-num-gpus"] = self.num_gpus
        return out

    def environment(self, env: Mapping[str, str]) -> dict[str, str]:
        """``env`` for the SuperLink (whose children run the simulation): RAY_ADDRESS set
        to the cluster or removed, and the cards a private Ray may use."""
        out = dict(env)
        if self.address is not None:
            out[RAY_ADDRESS_ENV] = self.address
        else:
            out.pop(RAY_ADDRESS_ENV, None)
        if self.cuda_devices is not None:
            out[CUDA_ENV] = self.cuda_devices
        return out

    def describe(self) -> str:
        """A few words for the console."""
        if self.address is not None:
            return f"the Ray cluster at {self.address}"
        if self.num_cpus is None and self.num_gpus is None:
            return "a private Ray on this machine"
        gpus = f", GPU {self.cuda_devices}" if self.cuda_devices else ""
        return f"a private Ray of {self.num_cpus} CPU{'s' * (self.num_cpus != 1)}{gpus}"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


# --- the address ------------------------------------------------------------------------
def resolve_address(flag: str | None,
                    environ: Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """(the cluster address, where it came from: ``--ray-address`` or ``RAY_ADDRESS``);
    (None, "") when neither names one (``RAY_ADDRESS=local`` starts a private Ray, as in
    Ray)."""
    environ = os.environ if environ is None else environ
    if flag is not None:
        return flag.strip(), "--ray-address"
    env = environ.get(RAY_ADDRESS_ENV, "").strip()
    if env.lower() in _LOCAL:
        return None, ""
    return env, RAY_ADDRESS_ENV


def address_problem(address: str, source: str = "--ray-address") -> str | None:
    """Why ``address`` is not a cluster address a simulation can join, as one line, or
    None. Allowed: HOST:PORT of the head's GCS (what ``ray start --head`` prints) or
    ``auto`` (the cluster started on this machine)."""
    if address == "auto":
        return None
    if address.startswith("ray://"):
        return (f"{source}: got {address!r}; a Ray Client address (ray://) is not supported: "
                "give HOST:PORT of the cluster's head (`ray start --head --port PORT`), and "
                "run bonsai on a machine of the cluster")
    m = _HOST_PORT.match(address)
    if not m or not 1 <= int(m["port"]) <= 65535:
        return (f"{source}: got {address!r}; allowed: HOST:PORT of the cluster's head (port "
                "1..65535, e.g. 10.0.0.5:6379) or auto")
    return None


def reachable_problem(address: str, source: str = "--ray-address",
                      timeout: float = 5.0) -> str | None:
    """Why nothing answers at ``address`` (a TCP connection to the head's GCS port), as
    one line, or None. ``auto`` is left to Ray."""
    m = _HOST_PORT.match(address)
    if m is None:
        return None
    host, port = m["host"].strip("[]"), int(m["port"])
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return None
    except OSError as e:
        why = e.strerror or type(e).__name__
        return (f"{source}: no Ray cluster answers at {address} ({why}); start its head with "
                f"`ray start --head --port {port}` or give the address it printed")


# --- shares of this machine ----------------------------------------------------------------
def machine_resources(environ: Mapping[str, str] | None = None) -> tuple[int, list[str]]:
    """(CPUs this process may run on, the GPU ids it sees).

    GPUs: ``CUDA_VISIBLE_DEVICES`` when set, else the NVIDIA device files
    ``/dev/nvidia0``, ``/dev/nvidia1``, ... (what a container is given): no CUDA
    library is loaded, so ``bonsai sweep`` stays a small process.
    """
    environ = os.environ if environ is None else environ
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    if CUDA_ENV in environ:
        gpus = [g.strip() for g in environ[CUDA_ENV].split(",") if g.strip()]
        gpus = [] if gpus and gpus[0] in ("-1", "none", "NoDevFiles") else gpus
    else:
        found = (re.fullmatch(r"/dev/nvidia(\d+)", p) for p in glob.glob("/dev/nvidia*"))
        gpus = sorted((m[1] for m in found if m), key=int)
    return cpus, gpus


def local_shares(n: int, cpus: int, gpus: list[str]) -> list[RayTarget]:
    """``n`` private Rays that divide this machine: ``cpus // n`` CPUs each (at least 1);
    whole cards when there are at least ``n`` (``len(gpus) // n`` each), else card
    ``i % len(gpus)`` for the i-th (cells on one card each see all of it: Ray's GPU
    fractions are scheduling hints, not memory limits)."""
    per_cpu = max(1, cpus // n)
    out = []
    for i in range(n):
        if len(gpus) >= n:
            k = len(gpus) // n
            mine = gpus[i * k:(i + 1) * k]
        elif gpus:
            mine = [gpus[i % len(gpus)]]
        else:
            mine = []
        out.append(RayTarget(num_cpus=per_cpu, num_gpus=len(mine),
                             cuda_devices=",".join(mine) if gpus else None))
    return out


# --- which node trained a reply -----------------------------------------------------------
def node_number(node_id: str) -> int:
    """The metric value of a Ray node id (hex): its first :data:`NODE_DIGITS` digits."""
    return int(node_id[:NODE_DIGITS], 16)


def node_label(number: int | float) -> str:
    """The hex digits a :func:`node_number` came from (a round record's ``ray_nodes``)."""
    return f"{int(number):0{NODE_DIGITS}x}"


def current_ray_node() -> int | None:
    """:func:`node_number` of the Ray node this process runs on, or None outside Ray.

    Ray is looked up, never imported: a simulation's actor has it loaded, a deployed
    SuperNode does not need it.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return None
    return node_number(ray.get_runtime_context().get_node_id())
