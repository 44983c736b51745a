"""A run's results folder: where it goes, whether it may be written, resuming one.

``bonsai run`` and ``bonsai deploy local`` make ``OUTPUT_DIR/NAME-TIMESTAMP`` (or
``run_dir``) before anything starts; a folder is never shared between two runs
(no run's config.json is overwritten, no rounds.jsonl gets another run's rounds
appended), and ``--resume`` continues one only with the same config.
"""

from __future__ import annotations

import tempfile
from datetime import datetime
from pathlib import Path

from fl.config import FIELDS, ExperimentConfig, config_differences, to_flat, to_json
from fl.results import CONFIG_JSON, RUN_CONFIG_TOML, SUMMARY_JSON, read_run_config

__all__ = ["RunDirError", "check_resume", "check_run_dir", "prepare_run_dir",
           "writable_problem"]


class RunDirError(ValueError):
    """The run's folder cannot be made (one line; a user error, exit code 2)."""


def writable_problem(folder: Path, key: str, shown: str) -> str | None:
    """Why a folder cannot be created at or under ``folder``, or None. Probes the
    nearest existing ancestor with a temporary folder it removes at once (permission
    bits do not tell: root ignores them, a read-only mount does not show in them)."""
    anc = folder
    while not anc.exists() and anc != anc.parent:
        anc = anc.parent
    if not anc.is_dir():
        return f"{key}: {shown!r}: {str(anc)!r} is a file, not a folder"
    try:
        tempfile.TemporaryDirectory(dir=anc, prefix=".bonsai-probe-").cleanup()
    except OSError as e:
        return f"{key}: {shown!r} cannot be written ({e.strerror or type(e).__name__} in " \
               f"{str(anc)!r})"
    return None


def check_run_dir(cfg: ExperimentConfig, file: str = "FILE") -> str | None:
    """Why ``cfg``'s run cannot start a new results folder, as one line, or None.

    Without ``run_dir``: OUTPUT_DIR must be (or be creatable as) a writable folder.
    With ``run_dir`` (``--set run_dir=DIR``): DIR must be new or an empty folder; a
    Bonsai run folder of the same config is to be continued with ``--resume``, and
    any other non-empty folder is refused, so no run's config.json is overwritten and
    no rounds.jsonl gets another run's rounds appended. Creates nothing.
    """
    if not cfg.run_dir:
        out = Path(cfg.output_dir).expanduser()
        return writable_problem(out.resolve(), "output_dir", cfg.output_dir)
    d = Path(cfg.run_dir).expanduser().resolve()
    if d.exists() and not d.is_dir():
        return f"run_dir: {str(d)!r} is a file, not a folder"
    if d.is_dir() and any(d.iterdir()):
        old = read_run_config(d)
        if old is None or not set(old) & set(FIELDS):
            return (f"run_dir: {str(d)!r} is not empty and holds no Bonsai run; give a new "
                    "or empty folder")
        diffs = config_differences(old, to_flat(cfg))
        if diffs:
            return (f"run_dir: {str(d)!r} holds another run ({'; '.join(diffs[:2])}); give a "
                    "new or empty folder")
        if (d / SUMMARY_JSON).exists():
            return f"run_dir: {str(d)!r} already holds a finished run of this config"
        return (f"run_dir: {str(d)!r} holds an unfinished run of this config; continue it "
                f"with `bonsai run {file} --resume {d}`")
    return writable_problem(d, "run_dir", cfg.run_dir)


def prepare_run_dir(cfg: ExperimentConfig) -> Path:
    """Create OUTPUT_DIR/NAME-TIMESTAMP (absolute) and pin it in the config.

    Raises RunDirError when the folder cannot be created."""
    if not cfg.run_dir:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        base = Path(cfg.output_dir).expanduser().resolve() / f"{cfg.name}-{stamp}"
        path, i = base, 1
        while path.exists():
            path, i = base.with_name(f"{base.name}-{i}"), i + 1
        cfg.run_dir = str(path)
    run_dir = Path(cfg.run_dir).expanduser().resolve()
    if (run_dir / SUMMARY_JSON).exists() and not cfg.resume:
        raise RunDirError(f"run_dir: {str(run_dir)!r} already holds a finished run")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise RunDirError(f"run_dir: {str(run_dir)!r} cannot be created "
                          f"({e.strerror or type(e).__name__})") from None
    cfg.run_dir = str(run_dir)
    return run_dir


def check_resume(cfg: ExperimentConfig, run_dir: Path) -> str | None:
    """Point ``cfg`` at ``run_dir`` to resume it; the problem as one line, or None.

    ``output_dir`` is taken from the run's own config (it only said where the folder
    was made), so resuming needs the same experiment file and ``--set`` overrides but
    not the original ``--set output_dir``. A run stopped before its first round ended
    has no checkpoint: it is started again from round 1 in the same folder (``cfg.resume``
    is then False), provided the folder's config is the same.
    """
    from fl.checkpoint import CHECKPOINT, CheckpointError  # torch: imported only to resume
    from fl.checkpoint import load as load_checkpoint

    run_dir = run_dir.expanduser().resolve()
    if not run_dir.is_dir():
        return f"--resume: {str(run_dir)!r} is not a folder"
    if (run_dir / SUMMARY_JSON).exists():
        return f"--resume: {str(run_dir)!r} holds a finished run; nothing to resume"
    old = read_run_config(run_dir)
    if old is not None and not set(old) & set(FIELDS):
        old = None  # not a config of ours
    if old is not None and isinstance(old.get("output_dir"), str):
        cfg.output_dir = old["output_dir"]
    cfg.run_dir, cfg.resume = str(run_dir), True
    if not (run_dir / CHECKPOINT).exists():
        if old is None:
            return (f"--resume: {str(run_dir)!r} has no {CHECKPOINT} and is not a Bonsai run "
                    f"folder (no readable {CONFIG_JSON} or {RUN_CONFIG_TOML})")
        diffs = config_differences(old, to_flat(cfg))
        if diffs:
            return (f"--resume: {str(run_dir)!r} was made with a different config "
                    f"({'; '.join(diffs[:2])}); resume with the same experiment file and "
                    "--set overrides")
        cfg.resume = False  # stopped before round 1 ended: nothing to load, start it again
        return None
    try:
        ckpt = load_checkpoint(run_dir, to_json(cfg))
    except CheckpointError as e:
        return str(e)
    if ckpt.round >= cfg.rounds:
        return f"--resume: the checkpoint is at round {ckpt.round}, rounds={cfg.rounds}"
    return None
