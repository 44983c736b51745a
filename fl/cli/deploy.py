"""``bonsai deploy ...``: the same app over Flower's SuperLink and SuperNodes.

    bonsai deploy keys --out DIR [--host H ...] [--nodes N]   CA, SuperLink cert, node keys
    bonsai deploy superlink --keys DIR [--port 8000]          flower-superlink, TLS + node auth
    bonsai deploy register KEY.pub --superlink H:P --keys DIR register a SuperNode's key
    bonsai deploy supernode --superlink H:P --data PATH ...   flower-supernode on this node's data
    bonsai deploy run FILE --superlink H:P --keys DIR         flwr run of an experiment file
    bonsai deploy split FILE --out DIR                        one .npz per node from a dataset
    bonsai deploy local FILE --nodes N --data DIR             a whole federation on loopback

TLS and SuperNode authentication are on unless ``--insecure`` (loopback tests
only). Every user error (a missing or mismatched certificate, a data path that
does not exist or does not fit the model, a port in use) is one line and exit
code 2, before anything starts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from fl import interrupts
from fl.cli.common import DEFAULT_EXPERIMENT, fail, load_or_fail
from fl.cli.run import (
    RunDirError,
    _print_summary,
    check_run_dir,
    prepare_run_dir,
    wait_run,
    writable_problem,
)
from fl.config import ExperimentConfig, shown
from fl.data import (
    DataError,
    check_dataset,
    check_model_fit,
    load_federated,
    load_local,
    node_data,
    prepare,
)
from fl.deploy.keys import (
    KeyFileError,
    cert_hosts,
    check_node_key,
    check_node_tls,
    check_superlink_tls,
    make_keys,
)
from fl.deploy.local import LocalFederation, LocalNode, existing_keys
from fl.deploy.processes import (
    DEFAULT_NODE_PORT,
    DEFAULT_SUPERLINK_PORT,
    DeployError,
    Processes,
    SuperLinkSpec,
    SuperNodeSpec,
    check_port_free,
    connection_toml,
    register_node,
    superlink_command,
    supernode_command,
)
from fl.flowerapp import write_app, write_run_config
from fl.node import DATA_PATH, DEVICE, DEVICES, METRICS_PATH, NUM_CLASSES, PARTITION_ID, THREADS
from fl.proctree import MARKER_ENV
from fl.progress import watch
from fl.results import RUN_CONFIG_TOML, SUMMARY_JSON
from fl.runtime import FLOWER_ENV, RuntimeFailure, flower_bin

USER_ERRORS = (KeyFileError, DeployError, DataError, ValueError)
#: certificate validity allowed by ``deploy keys --days`` (100 years; datetime overflows
#: near 3 million days)
MAX_DAYS = 36_500


def check_port(port: int, flag: str = "--port") -> None:
    """A TCP port: 1..65535 (raises DeployError)."""
    if not 1 <= port <= 65535:
        raise DeployError(f"{flag}: got {port}; allowed: 1..65535")


def check_address(text: str, flag: str = "--superlink") -> None:
    """``HOST:PORT`` (``[::1]:9092`` for IPv6) with PORT in 1..65535 (raises DeployError)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise DeployError(f"{flag}: got {shown(text)}; expected HOST:PORT with PORT in "
                          "1..65535")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("deploy", help="run the app over Flower SuperLink/SuperNodes (TLS, "
                       "node auth)", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    dsub = p.add_subparsers(dest="deploy_command", required=True)

    k = dsub.add_parser("keys", help="create a CA, a SuperLink certificate and SuperNode keys")
    k.add_argument("--out", required=True, help="folder to write (keep ca.key private)")
    k.add_argument("--host", action="append", default=[], metavar="HOST",
                   help="name or IP the SuperLink is reached at (repeatable; localhost and "
                        "127.0.0.1 are always included)")
    k.add_argument("--nodes", type=int, default=2, help="key pairs node-0..node-{N-1} "
                   "(default 2)")
    k.add_argument("--name", action="append", default=[], metavar="NAME",
                   help="explicit node key names instead of --nodes (repeatable)")
    k.add_argument("--days", type=int, default=365, help="certificate validity (default 365)")
    k.add_argument("--force", action="store_true",
                   help="replace existing files after moving them into OUT/backup-TIMESTAMP/ "
                        "(without it, any existing file stops the command: nothing written)")
    k.set_defaults(func=cmd_keys)

    s = dsub.add_parser("superlink", help="start flower-superlink with TLS and node auth")
    _tls_args(s, server=True)
    s.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    s.add_argument("--port", type=int, default=DEFAULT_SUPERLINK_PORT,
                   help=f"nodes, the flwr CLI and the ServerApp use this one port "
                        f"(default {DEFAULT_SUPERLINK_PORT})")
    s.add_argument("--no-node-auth", action="store_true",
                   help="accept any SuperNode (TLS still on)")
    s.add_argument("--database", help="keep state (registered nodes, runs) in this file "
                   "across restarts")
    s.add_argument("--dry-run", action="store_true", help="check and print the command only")
    s.set_defaults(func=cmd_superlink)

    r = dsub.add_parser("register", help="register SuperNode public keys with a SuperLink")
    r.add_argument("public_keys", nargs="+", metavar="KEY.pub")
    r.add_argument("--superlink", required=True, metavar="HOST:PORT")
    _tls_args(r, server=False)
    r.set_defaults(func=cmd_register)

    n = dsub.add_parser("supernode", help="start flower-supernode on this node's own data")
    n.add_argument("--superlink", required=True, metavar="HOST:PORT")
    n.add_argument("--data", required=True, metavar="PATH",
                   help="this node's .npz (x, y) or image folder (one sub-folder per class)")
    _tls_args(n, server=False)
    n.add_argument("--name", help="node key name inside --keys (default node-0)")
    n.add_argument("--auth-key", help="the node's private key (instead of --keys/--name)")
    n.add_argument("--port", type=int, default=DEFAULT_NODE_PORT,
                   help=f"this node's local API port; distinct per node on one host (default "
                        f"{DEFAULT_NODE_PORT})")
    n.add_argument("--partition-id", type=int, default=None,
                   help="place in the population order (default: N of a node-N key, else 0)")
    n.add_argument("--num-classes", type=int, default=None,
                   help="classes of the global model, when neither the data nor an "
                        "--experiment tells")
    n.add_argument("--device", choices=DEVICES, default=None, help="edge profile: cpu makes "
                   "the node CPU-only (no GPU visible)")
    n.add_argument("--threads", type=int, default=None, help="edge profile: CPU threads for "
                   "local training")
    n.add_argument("--metrics-file", help="append the node's train seconds and peak memory "
                   "per round here (JSON lines, on this node)")
    n.add_argument("--experiment", help="check --data against this experiment's model "
                   "before connecting")
    n.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    n.add_argument("--dry-run", action="store_true", help="check and print the command only")
    n.set_defaults(func=cmd_supernode)

    ru = dsub.add_parser("run", help="run an experiment on a running SuperLink (flwr run)")
    ru.add_argument("file", nargs="?", default=DEFAULT_EXPERIMENT)
    ru.add_argument("--superlink", required=True, metavar="HOST:PORT")
    _tls_args(ru, server=False)
    ru.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ru.set_defaults(func=cmd_run)

    sp = dsub.add_parser("split", help="write one .npz per node from an experiment's partitions")
    sp.add_argument("file", nargs="?", default=DEFAULT_EXPERIMENT)
    sp.add_argument("--out", required=True)
    sp.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    sp.set_defaults(func=cmd_split)

    lo = dsub.add_parser("local", help="SuperLink + N SuperNodes on loopback, run an experiment")
    lo.add_argument("file", nargs="?", default=DEFAULT_EXPERIMENT)
    lo.add_argument("--nodes", type=int, required=True, help="SuperNodes to start")
    lo.add_argument("--data", required=True, metavar="DIR", help="folder with one .npz file "
                    "or image folder per node (sorted; the first N are used)")
    lo.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    lo.add_argument("--keys", help="an existing `bonsai deploy keys` folder (default: fresh "
                    "keys in a private temporary folder)")
    lo.add_argument("--device", choices=DEVICES, default=None, help="edge profile of every node")
    lo.add_argument("--threads", type=int, default=None, help="CPU threads of every node")
    lo.add_argument("--insecure", action="store_true", help="no TLS, no node auth (debugging)")
    lo.add_argument("--quiet", action="store_true", help="no live table")
    lo.set_defaults(func=cmd_local)


def _tls_args(p: argparse.ArgumentParser, server: bool) -> None:
    p.add_argument("--keys", help="a `bonsai deploy keys` folder (ca.crt, superlink.*, nodes/)")
    p.add_argument("--ca", help="CA certificate (default KEYS/ca.crt)")
    if server:
        p.add_argument("--cert", help="SuperLink certificate (default KEYS/superlink.crt)")
        p.add_argument("--key", help="SuperLink private key (default KEYS/superlink.key)")
    p.add_argument("--insecure", action="store_true",
                   help="no TLS (and no node auth): loopback tests only")


def _from_keys(args: argparse.Namespace, attr: str, name: str) -> str | None:
    value = getattr(args, attr, None)
    if value:
        return str(Path(value).expanduser())
    if args.keys:
        return str(Path(args.keys).expanduser() / name)
    return None


def _flower_env(marker: str | None = None) -> dict[str, str]:
    env = {**os.environ, **FLOWER_ENV}
    if marker:
        env[MARKER_ENV] = marker
    return env


def _foreground(name: str, cmd: list[str], env: dict[str, str], cwd: str | None = None,
                remove: tuple[str, ...] = ()) -> int:
    """Run a Flower process in the foreground; Ctrl-C or SIGTERM ends it and its children,
    and so does a watchdog when this process is killed (then it removes ``remove``)."""
    interrupts.install()
    # Flower's own log goes to our stdout/stderr; the process is ended by PID with its children
    procs = Processes(env, env.get(MARKER_ENV), remove=remove)
    try:
        try:
            return procs.start(name, cmd, None, cwd=cwd).wait()
        finally:
            procs.close()
    except KeyboardInterrupt:
        return 130
    except RuntimeFailure as e:  # a process survived the teardown: the message names it
        return fail(str(e), code=1)


# --- keys ---------------------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace) -> int:
    if not 1 <= args.days <= MAX_DAYS:
        return fail(f"--days: got {args.days}; allowed: 1..{MAX_DAYS}")
    out = Path(args.out).expanduser()
    problem = (f"--out: {str(out)!r} is a file, not a folder" if out.exists() and not
               out.is_dir() else writable_problem(out.resolve(), "--out", args.out))
    if problem:
        return fail(problem)
    try:
        ks = make_keys(args.out, args.host, args.name or args.nodes, days=args.days,
                       force=args.force)
    except KeyFileError as e:
        return fail(str(e))
    hosts = ", ".join(cert_hosts(ks.superlink_cert))
    if ks.backup is not None:
        moved = sum(1 for f in ks.backup.rglob("*") if not f.is_dir())
        print(f"moved {moved} existing file(s) it replaced to {ks.backup}/")
    print(f"wrote {ks.dir}/")
    print("  ca.crt          CA certificate: give it to every SuperNode and flwr CLI user")
    print("  ca.key          CA private key: keep it offline")
    print(f"  superlink.crt   SuperLink certificate, valid for {hosts}")
    print("  superlink.key   SuperLink private key: stays on the SuperLink machine")
    for n in ks.nodes:
        print(f"  nodes/{n:<9} {n}'s authentication key: copy to that node only")
        print(f"  nodes/{n}.pub {'':<{max(0, 4 - len(n))}}register it: bonsai deploy register "
              f"{ks.node_pub(n)} --superlink HOST:PORT --keys {ks.dir}")
    return 0


# --- superlink ----------------------------------------------------------------------------
def superlink_spec(args: argparse.Namespace) -> SuperLinkSpec:
    """Checked spec of ``bonsai deploy superlink`` (raises a user error)."""
    check_port(args.port)
    if args.insecure:
        spec = SuperLinkSpec(host=args.host, port=args.port, insecure=True,
                             database=args.database)
    else:
        ca, cert, key = (_from_keys(args, "ca", "ca.crt"),
                         _from_keys(args, "cert", "superlink.crt"),
                         _from_keys(args, "key", "superlink.key"))
        if not (ca and cert and key):
            raise DeployError("--keys (or --ca, --cert and --key) is required for TLS; create "
                              "them with `bonsai deploy keys --out DIR --host HOST`")
        check_superlink_tls(ca, cert, key)
        spec = SuperLinkSpec(host=args.host, port=args.port, ca_cert=ca, cert=cert, key=key,
                             node_auth=not args.no_node_auth, database=args.database)
    check_port_free(spec.host, spec.port, "--port")
    return spec


def cmd_superlink(args: argparse.Namespace) -> int:
    try:
        spec = superlink_spec(args)
        cmd = superlink_command(spec)
    except USER_ERRORS as e:
        return fail(str(e))
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return _foreground("superlink", cmd, _flower_env(os.urandom(8).hex()))


# --- register -----------------------------------------------------------------------------
def cmd_register(args: argparse.Namespace) -> int:
    ca = None if args.insecure else _from_keys(args, "ca", "ca.crt")
    try:
        check_address(args.superlink)
        if not args.insecure:
            if not ca:
                raise DeployError("--keys or --ca is required (the CA that signed the "
                                  "SuperLink's certificate)")
            check_node_tls(ca)
        for pub in args.public_keys:
            if not Path(pub).is_file():
                raise DeployError(f"{pub!r} does not exist")
    except USER_ERRORS as e:
        return fail(str(e))
    with tempfile.TemporaryDirectory(prefix="bonsai-register-") as home:
        (Path(home) / "config.toml").write_text(
            connection_toml("target", args.superlink, ca, insecure=args.insecure))
        env = {**_flower_env(), "FLWR_HOME": home}
        for pub in args.public_keys:
            name = Path(pub).name.removesuffix(".pub")
            try:
                node_id = register_node(pub, "target", env, name=name)
            except DeployError as e:
                return fail(str(e), code=1)
            print(f"registered {name} ({pub}) as node {node_id}")
    return 0


# --- supernode ----------------------------------------------------------------------------
def default_partition_id(key_path: str | None) -> int:
    """``node-3`` -> 3: a node's place in the population order from its key name."""
    m = re.search(r"(\d+)$", Path(key_path).name) if key_path else None
    return int(m.group(1)) if m else 0


def supernode_spec(args: argparse.Namespace) -> SuperNodeSpec:
    """Checked spec of ``bonsai deploy supernode`` (raises a user error)."""
    check_port(args.port)
    check_address(args.superlink)
    data = str(Path(args.data).expanduser().resolve())
    key = None
    if args.auth_key:
        key = str(Path(args.auth_key).expanduser())
    elif args.keys and not args.insecure:
        key = str(Path(args.keys).expanduser() / "nodes" / (args.name or "node-0"))
    pid = args.partition_id if args.partition_id is not None else default_partition_id(
        key or args.name)
    node_config: dict[str, Any] = {PARTITION_ID: pid, DATA_PATH: data}
    for flag, key_name in ((args.num_classes, NUM_CLASSES), (args.device, DEVICE),
                           (args.threads, THREADS)):
        if flag is not None:
            node_config[key_name] = flag
    if args.threads is not None and args.threads < 1:
        raise DeployError(f"--threads: got {args.threads}; allowed: >= 1")
    if args.metrics_file:
        node_config[METRICS_PATH] = str(Path(args.metrics_file).expanduser().resolve())
    # the data: exists, loads, and (with --experiment) fits the model
    if args.experiment:
        cfg = load_or_fail(args.experiment, args.overrides)
        if isinstance(cfg, int):
            raise DeployError("--experiment: see the problems above")
        node = node_data(cfg, node_config)
        check_model_fit(cfg.model, node.input_shape, node.num_classes, f"data-path: {data!r}")
    else:
        load_local(data)
        node = None
    if not args.insecure:
        ca = _from_keys(args, "ca", "ca.crt")
        if not ca:
            raise DeployError("--keys or --ca is required (the CA that signed the SuperLink's "
                              "certificate); --insecure only for loopback tests")
        check_node_tls(ca)
        if key is None:
            raise DeployError("--keys with --name, or --auth-key, is required: the SuperLink "
                              "authenticates nodes by their key")
        check_node_key(key)
    else:
        ca = None
    check_port_free("127.0.0.1", args.port, "--port")
    del node
    return SuperNodeSpec(superlink=args.superlink, root_cert=ca, auth_key=key, port=args.port,
                         node_config=node_config, insecure=args.insecure)


def cmd_supernode(args: argparse.Namespace) -> int:
    try:
        spec = supernode_spec(args)
        cmd = supernode_command(spec)
    except USER_ERRORS as e:
        return fail(str(e))
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = _flower_env(os.urandom(8).hex())
    if args.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    return _foreground("supernode", cmd, env)


# --- run ------------------------------------------------------------------------------------
def cmd_run(args: argparse.Namespace) -> int:
    """``flwr run`` of the experiment on a running SuperLink; Flower's log streams here.

    The ServerApp runs on the SuperLink's machine: ``output_dir`` is a path there.
    """
    cfg = load_or_fail(args.file, args.overrides)
    if isinstance(cfg, int):
        return cfg
    ca = None if args.insecure else _from_keys(args, "ca", "ca.crt")
    try:
        check_address(args.superlink)
        if not args.insecure:
            if not ca:
                raise DeployError("--keys or --ca is required (the CA that signed the "
                                  "SuperLink's certificate)")
            check_node_tls(ca)
    except USER_ERRORS as e:
        return fail(str(e))
    with tempfile.TemporaryDirectory(prefix="bonsai-run-", ignore_cleanup_errors=True) as home:
        (Path(home) / "config.toml").write_text(
            connection_toml("target", args.superlink, ca, insecure=args.insecure))
        run_config = write_run_config(cfg, Path(home) / RUN_CONFIG_TOML)
        app = write_app(Path(home) / "app")
        cmd = [flower_bin("flwr"), "run", str(app), "target", "--stream",
               "--run-config", str(run_config)]
        env = {**_flower_env(os.urandom(8).hex()), "FLWR_HOME": home}
        return _foreground("flwr-run", cmd, env, cwd=str(app), remove=(home,))


# --- split --------------------------------------------------------------------------------
def write_split(cfg: ExperimentConfig, out: str | Path) -> list[Path]:
    """One ``node-i.npz`` (x, y, num_classes) per partition of ``cfg``'s dataset."""
    fd = load_federated(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(len(fd.partitions)):
        a = fd.client(i)
        p = out / f"node-{i}.npz"
        np.savez_compressed(p, x=a.x.numpy(), y=a.y.numpy(), num_classes=np.int64(fd.num_classes))
        paths.append(p)
    return paths


def cmd_split(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, args.overrides)
    if isinstance(cfg, int):
        return cfg
    out = Path(args.out).expanduser()
    problem = (f"--out: {str(out)!r} is a file, not a folder" if out.exists() and not
               out.is_dir() else writable_problem(out.resolve(), "--out", args.out))
    if problem:
        return fail(problem)
    try:
        prepare(cfg)  # the data and the model checked before a file is written
        paths = write_split(cfg, args.out)
    except DataError as e:
        return fail(str(e))
    for p in paths:
        with np.load(p) as f:
            print(f"{p}: {len(f['y'])} examples")
    return 0


# --- local --------------------------------------------------------------------------------
def node_sources(data_dir: str | Path, n: int) -> list[Path]:
    """The first ``n`` node data sources in ``data_dir`` (.npz files and image folders)."""
    d = Path(data_dir).expanduser()
    if not d.is_dir():
        raise DataError(f"--data: {str(d)!r} is not a folder (expected one .npz file or image "
                        "folder per node)")
    found = sorted(p for p in d.iterdir()
                   if (p.is_file() and p.suffix == ".npz") or
                   (p.is_dir() and not p.name.startswith(".")))
    if len(found) < n:
        raise DataError(f"--data: {str(d)!r} holds {len(found)} node data sources (.npz files "
                        f"or image folders); --nodes {n} needs {n}")
    return found[:n]


def plan_local(cfg: ExperimentConfig, data_dir: str | Path, n: int,
               device: str | None = None, threads: int | None = None) -> list[LocalNode]:
    """The nodes of ``bonsai deploy local``, each one's data checked against the model."""
    if n < 1:
        raise DeployError(f"--nodes: got {n}; allowed: >= 1")
    if threads is not None and threads < 1:
        raise DeployError(f"--threads: got {threads}; allowed: >= 1")
    nodes = [LocalNode(f"node-{i}", str(p.resolve()), i, device=device, threads=threads)
             for i, p in enumerate(node_sources(data_dir, n))]
    for node in nodes:
        nd = node_data(cfg, node.node_config(None))  # raises DataError naming the path
        check_model_fit(cfg.model, nd.input_shape, nd.num_classes,
                        f"data-path: {node.data_path!r}")
    return nodes


def run_local(cfg: ExperimentConfig, nodes: list[LocalNode], console: Console | None = None,
              live: bool = True, keys_dir: str | None = None, insecure: bool = False,
              on_poll: Callable[[LocalFederation, Path], None] | None = None) -> dict[str, Any]:
    """Run ``cfg`` on a loopback federation of ``nodes``; return the run's summary.

    ``on_poll(federation, run_dir)`` is called while the run is going (tests use
    it to crash a node mid-run). Raises RuntimeFailure when no summary appears.
    """
    console = console or Console()
    run_dir = prepare_run_dir(cfg)
    run_config = write_run_config(cfg, run_dir / RUN_CONFIG_TOML)
    summary_path = run_dir / SUMMARY_JSON
    with LocalFederation(run_dir, nodes, keys_dir=keys_dir, insecure=insecure) as fed:
        proc = fed.flwr_run(run_config)
        for node in fed.wait_nodes():
            console.print(f"[yellow]{node.name} was refused by the SuperLink (its key is not "
                          f"registered); going on without it[/yellow]")

        def running() -> bool:
            if on_poll is not None:
                on_poll(fed, run_dir)
            return proc.poll() is None and not summary_path.exists()

        if live:
            watch(run_dir, cfg.rounds, running, console)
        else:
            while running():
                time.sleep(0.25)
        rc = wait_run(proc, summary_path)
        if rc is None:  # all is saved: what is left is Flower's shutdown
            fed.close(grace=0.0)
    if not summary_path.exists():
        tail = (run_dir / "flower.log").read_text(errors="replace").splitlines()[-25:]
        raise RuntimeFailure(
            f"the run ended (flwr exit code {rc}) without a summary; last lines of "
            f"{run_dir / 'flower.log'}:\n" + "\n".join(tail))
    summary = json.loads(summary_path.read_text())
    summary["nodes"] = {n.name: ("refused" if n.refused else n.node_id) for n in nodes}
    return summary


def cmd_local(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, [*args.overrides, f"partition.num_clients={args.nodes}"])
    if isinstance(cfg, int):
        return cfg
    if cfg.resume:
        return fail("resume: got True; `bonsai deploy local` always starts a new run")
    problem = check_run_dir(cfg, args.file)
    if problem:
        return fail(problem)
    try:
        nodes = plan_local(cfg, args.data, args.nodes, args.device, args.threads)
        if cfg.dataset.name != "hf":  # the server's test split (hf needs the network)
            check_dataset(cfg)
        if args.keys:
            existing_keys(args.keys, [n.name for n in nodes])
    except USER_ERRORS as e:
        return fail(str(e))
    console = Console()
    interrupts.install()
    t0 = time.perf_counter()
    try:
        summary = run_local(cfg, nodes, console, live=not args.quiet, keys_dir=args.keys,
                            insecure=args.insecure)
    except RunDirError as e:
        return fail(str(e))
    except KeyboardInterrupt as e:
        return fail(f"interrupted; {interrupts.stopped(e)}; partial results in {cfg.run_dir}",
                    code=130)
    except (RuntimeFailure, DeployError) as e:
        return fail(str(e), code=1)
    _print_summary(console, summary, time.perf_counter() - t0)
    return 0
