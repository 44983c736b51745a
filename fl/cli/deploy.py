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
import os
import time
from pathlib import Path

import numpy as np
from rich.console import Console

from fl import interrupts
from fl.cli.common import DEFAULT_EXPERIMENT, fail, load_or_fail, print_summary
from fl.data import check_dataset
from fl.deploy.keys import KeyFileError, cert_hosts, make_keys
from fl.deploy.local import existing_keys, plan_local, run_local
from fl.deploy.processes import (
    DEFAULT_NODE_PORT,
    DEFAULT_SUPERLINK_PORT,
    DeployError,
    flower_env,
    run_foreground,
    superlink_command,
    supernode_command,
)
from fl.deploy.remote import register_keys, run_experiment
from fl.deploy.specs import check_address, client_ca, superlink_spec, supernode_spec
from fl.deploy.split import write_split
from fl.node import DEVICES
from fl.procgroup import RuntimeFailure
from fl.rundir import RunDirError, check_run_dir, writable_problem
from fl.tracking import missing_packages
from fl.userdata import DataError

USER_ERRORS = (KeyFileError, DeployError, DataError, ValueError)


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


def _foreground(name: str, cmd: list[str], env: dict[str, str]) -> int:
    """Run a Flower process in the foreground; its exit code, 130 after Ctrl-C."""
    try:
        return run_foreground(name, cmd, env)
    except KeyboardInterrupt:
        return 130
    except RuntimeFailure as e:  # a process survived the teardown: the message names it
        return fail(str(e), code=1)


def _out_problem(out_arg: str) -> str | None:
    out = Path(out_arg).expanduser()
    if out.exists() and not out.is_dir():
        return f"--out: {str(out)!r} is a file, not a folder"
    return writable_problem(out.resolve(), "--out", out_arg)


# --- keys ---------------------------------------------------------------------------------
def cmd_keys(args: argparse.Namespace) -> int:
    problem = _out_problem(args.out)
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
def cmd_superlink(args: argparse.Namespace) -> int:
    try:
        spec = superlink_spec(host=args.host, port=args.port, keys_dir=args.keys, ca=args.ca,
                              cert=args.cert, key=args.key, insecure=args.insecure,
                              node_auth=not args.no_node_auth, database=args.database)
        cmd = superlink_command(spec)
    except USER_ERRORS as e:
        return fail(str(e))
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    return _foreground("superlink", cmd, flower_env(os.urandom(8).hex()))


# --- register -----------------------------------------------------------------------------
def cmd_register(args: argparse.Namespace) -> int:
    try:
        check_address(args.superlink)
        ca = client_ca(args.ca, args.keys, args.insecure)
        for pub in args.public_keys:
            if not Path(pub).is_file():
                raise DeployError(f"{pub!r} does not exist")
    except USER_ERRORS as e:
        return fail(str(e))
    try:
        for name, pub, node_id in register_keys(args.public_keys, args.superlink, ca,
                                                args.insecure):
            print(f"registered {name} ({pub}) as node {node_id}")
    except DeployError as e:
        return fail(str(e), code=1)
    return 0


# --- supernode ----------------------------------------------------------------------------
def cmd_supernode(args: argparse.Namespace) -> int:
    experiment = None
    if args.experiment:
        experiment = load_or_fail(args.experiment, args.overrides)
        if isinstance(experiment, int):
            return experiment
    try:
        spec = supernode_spec(
            superlink=args.superlink, data=args.data, port=args.port, keys_dir=args.keys,
            name=args.name, auth_key=args.auth_key, ca=args.ca, insecure=args.insecure,
            partition_id=args.partition_id, num_classes=args.num_classes, device=args.device,
            threads=args.threads, metrics_file=args.metrics_file, experiment=experiment)
        cmd = supernode_command(spec)
    except USER_ERRORS as e:
        return fail(str(e))
    print(" ".join(cmd), flush=True)
    if args.dry_run:
        return 0
    env = flower_env(os.urandom(8).hex())
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
    try:
        check_address(args.superlink)
        ca = client_ca(args.ca, args.keys, args.insecure)
    except USER_ERRORS as e:
        return fail(str(e))
    try:
        return run_experiment(cfg, args.superlink, ca, args.insecure)
    except KeyboardInterrupt:
        return 130
    except RuntimeFailure as e:
        return fail(str(e), code=1)


# --- split --------------------------------------------------------------------------------
def cmd_split(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, args.overrides)
    if isinstance(cfg, int):
        return cfg
    problem = _out_problem(args.out)
    if problem:
        return fail(problem)
    try:
        paths = write_split(cfg, args.out)
    except DataError as e:
        return fail(str(e))
    for p in paths:
        with np.load(p) as f:
            print(f"{p}: {len(f['y'])} examples")
    return 0


# --- local --------------------------------------------------------------------------------
def cmd_local(args: argparse.Namespace) -> int:
    cfg = load_or_fail(args.file, [*args.overrides, f"partition.num_clients={args.nodes}"])
    if isinstance(cfg, int):
        return cfg
    if cfg.resume:
        return fail("resume: got True; `bonsai deploy local` always starts a new run")
    if missing := missing_packages(cfg):  # a tracker's pip extra (fl.tracking)
        return fail(missing)
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
    print_summary(console, summary, time.perf_counter() - t0)
    return 0
