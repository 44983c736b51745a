"""One typed experiment config, loaded from YAML, overridden with ``key=value``,
validated before anything starts.

The same schema is the Flower run config: every field is a flat dotted key
(``partition.alpha``) with its default in ``[tool.flwr.app.config]`` of
pyproject.toml, so ``flwr run .`` and ``bonsai run`` read the same settings
(a test keeps the two in step). ``to_flat`` / ``from_flat`` convert.

Why one module of this length: every key, its default, its allowed values and the
rules between keys are read in one place; parsing and validation are the schema's.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import os
import reprlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from fl.dotted import flatten
from fl.yamlfile import YamlFileError, YamlSyntaxError, load_yaml, parse_yaml

Scalar = bool | int | float | str


#: unknown keys listed (each with a difflib suggestion) before the rest are counted
MAX_UNKNOWN_SHOWN = 20


class ConfigError(ValueError):
    """A config problem; ``problems`` holds one line per bad key."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


#: longest value shown in an error message (a 1 MB value must not make a 1 MB line)
SHOWN_CHARS = 80
_REPR = reprlib.Repr()
_REPR.maxstring = _REPR.maxother = SHOWN_CHARS
_REPR.maxlist = _REPR.maxtuple = _REPR.maxdict = _REPR.maxset = 8
_REPR.maxlevel = 3


def shown(value: Any, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)`` for a message, at most ``limit`` characters (``...`` marks a cut);
    never builds the full repr of a huge value."""
    return clip(_REPR.repr(value), limit)


def clip(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut."""
    return text if len(text) <= limit else text[:limit - 3] + "..."


def path_component_problem(key: str, value: str) -> str | None:
    """Why ``value`` cannot be one folder name (``name``, a study's name), or None.

    A name becomes part of a path (OUTPUT_DIR/NAME-TIMESTAMP): it must not hold a
    path separator or NUL, or be empty, ``.`` or ``..``, so it stays inside OUTPUT_DIR.
    """
    if value in ("", ".", "..") or any(ch in value for ch in "/\\\0"):
        return (f"{key}: got {shown(value)}; allowed: one folder name (not empty, '.' or "
                "'..'; no '/', '\\' or NUL)")
    return None


def _f(default: Any, *, choices: Iterable[Any] | None = None, lo: float | None = None,
       hi: float | None = None, lo_open: bool = False, doc: str = "",
       path_component: bool = False, auto: Any = None) -> Any:
    """A config field with its allowed values (checked by :func:`build`).

    ``auto``: a value outside the range that means "chosen from the other keys";
    :func:`build` replaces it (see :func:`_resolve_auto`), so a built config never
    holds it and config.json shows what ran.
    """
    meta = {"choices": tuple(choices) if choices else None, "lo": lo, "hi": hi,
            "lo_open": lo_open, "doc": doc, "path_component": path_component, "auto": auto}
    return field(default=default, metadata=meta)


#: W&B's modes a run may use (``disabled`` is tracking.wandb_project left empty)
WANDB_MODES = ("online", "offline")
#: MLflow tracking-URI schemes a run may name (other databases: behind an MLflow server)
MLFLOW_SCHEMES = ("http", "https", "sqlite", "file", "databricks")


@dataclass
class DatasetConfig:
    name: str = _f("digits", choices=("digits", "synthetic", "npz", "local", "hf"),
                   doc="digits | synthetic | npz (x/y arrays) | local (files read with "
                       "Hugging Face datasets) | hf (the hub, by name)")
    path: str = _f("", doc="npz: the .npz file; local: a parquet/csv/json/arrow file or folder, "
                           "an image folder or a save_to_disk folder (relative: from the "
                           "folder bonsai starts in)")
    format: str = _f("auto", choices=("auto", "parquet", "csv", "json", "arrow", "imagefolder",
                                      "disk"),
                     doc="local: how to read dataset.path (auto: from its suffix or content)")
    hf_name: str = _f("", doc="hf: the hub dataset id, e.g. uoft-cs/cifar10; local: the hub "
                              "dataset the files are a copy of (named in messages)")
    image_column: str = _f("", doc="local/hf: the image column (empty: img, image, or the one "
                                   "Image column)")
    text_column: str = _f("", doc="local/hf: the text column (empty: x, text)")
    label_column: str = _f("", doc="local/hf: the label column (empty: label, fine_label, "
                                   "labels, character, y)")
    partition_column: str = _f("", doc="local/hf: client ids for partition.kind=natural "
                                       "(empty: writer_id, character_id, client_id, user_id, "
                                       "speaker_id)")
    test_fraction: float = _f(0.2, lo=0.0, hi=0.9, lo_open=True,
                              doc="held-out centralized test split (local/hf: when the data "
                                  "has no test split)")
    normalize: bool = _f(False, doc="images: (x - mean) / std per channel, mean and std of the "
                                    "training pool")
    synthetic_alpha: float = _f(1.0, lo=0.0, doc="Synthetic(alpha, beta): model heterogeneity")
    synthetic_beta: float = _f(1.0, lo=0.0, doc="Synthetic(alpha, beta): data heterogeneity")
    synthetic_devices: int = _f(30, lo=1, hi=100_000, doc="devices the generator draws from")
    synthetic_samples: int = _f(6000, lo=10, hi=10_000_000, doc="total synthetic examples")


#: partition kinds (flwr-datasets partitioners; natural: one client per id)
PARTITION_KINDS = ("iid", "dirichlet", "pathological", "shard", "inner_dirichlet", "linear",
                   "square", "exponential", "natural")


@dataclass
class PartitionConfig:
    kind: str = _f("dirichlet", choices=PARTITION_KINDS,
                   doc="natural: one client per id (synthetic devices, a dataset's "
                       "partition column)")
    num_clients: int = _f(10, lo=0, hi=100_000,
                          doc="natural: at most the ids in the data (fewer: a seeded sample; "
                              "0: one client per id, counted from the data before the run)")
    alpha: float = _f(0.5, lo=0.0, lo_open=True, doc="dirichlet, inner_dirichlet: concentration")
    classes_per_client: int = _f(2, lo=1, doc="pathological: classes per client")
    shards_per_client: int = _f(2, lo=1, doc="shard: shards per client")
    min_size: int = _f(2, lo=0, doc="dirichlet: resample until every client has this many")


@dataclass
class TrainConfig:
    local_epochs: int = _f(2, lo=1, hi=1000)
    batch_size: int = _f(16, lo=1)
    lr: float = _f(0.05, lo=0.0, lo_open=True)
    optimizer: str = _f("sgd", choices=("sgd", "adamw"))
    momentum: float = _f(0.9, lo=0.0, hi=1.0)
    weight_decay: float = _f(0.0, lo=0.0)
    augment_crop_padding: int = _f(0, lo=0, hi=64,
                                   doc="images: random crop after padding by N pixels (0 = off)")
    augment_pad_mode: str = _f("zeros", choices=("zeros", "reflect"),
                               doc="how the crop's padding is filled")
    augment_flip: bool = _f(False, doc="images: random horizontal flip")


#: ``objective.margin_lambda`` that means "auto" (resolved by :func:`build`)
AUTO_MARGIN = -1.0
#: FedLD's margin-control weight (docs/ALGORITHMS.md §2.2), what "auto" gives under FedLD
FEDLD_MARGIN_LAMBDA = 0.1


@dataclass
class ObjectiveConfig:
    margin_lambda: float = _f(
        AUTO_MARGIN, lo=0.0, auto=AUTO_MARGIN,
        doc="FedLD margin control lambda; 0 = plain cross-entropy; -1 = auto: 0.1 when FedLD is "
            "the strategy (strategy.name=fedld) or the aggregation (strategy.aggregation=fedld "
            "in autoflip/random/magnitude), else 0; config.json holds the resolved value")


@dataclass
class StrategyConfig:
    name: str = _f("autoflip", choices=("fedavg", "fedavgm", "fedprox", "fedld", "autoflip",
                                      "random", "magnitude"),
                   doc="random/magnitude: pruning baselines on AutoFLIP's schedule")
    aggregation: str = _f("mean", choices=("mean", "fedld"),
                          doc="rule inside autoflip/random/magnitude; fedld always uses fedld")
    fraction_train: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True)
    fraction_evaluate: float = _f(0.0, lo=0.0, hi=1.0, doc="federated evaluation (0 = off)")
    min_train_clients: int = _f(2, lo=1)
    server_lr: float = _f(1.0, lo=0.0, lo_open=True, doc="server learning rate")
    server_momentum: float = _f(0.0, lo=0.0, hi=0.99,
                                doc="server momentum (fedavgm, autoflip); e.g. 0.9")
    k_proportion: float = _f(0.8, lo=0.0, hi=1.0, lo_open=True,
                             doc="fedld: fraction of principal directions kept")
    eigen_eps: float = _f(1e-8, lo=0.0, doc="fedld: drop directions with s_j <= eps * s_1")
    proximal_mu: float = _f(0.01, lo=0.0, doc="FedProx proximal term mu (fedprox, or any "
                                               "strategy with strategy.prox=true)")
    prox: bool = _f(False, doc="add FedProx's proximal term (mu = strategy.proximal_mu) to the "
                               "local objective under any strategy; fedprox always has it")
    round_timeout: float = _f(600.0, lo=0.0, lo_open=True, doc="seconds to wait for replies")


@dataclass
class PruningConfig:
    """AutoFLIP (and the random/magnitude baselines): docs/ALGORITHMS.md §1."""

    explore_fraction: float = _f(1.0, lo=0.0, hi=1.0, lo_open=True,
                                 doc="fraction of clients that explore (autoflip)")
    explore_epochs: int = _f(1, lo=1, hi=100, doc="local epochs of the exploration phase")
    structured_ratio: float = _f(0.5, lo=0.0, hi=0.95,
                                 doc="final fraction of units removed in each layer")
    unstructured_ratio: float = _f(0.5, lo=0.0, hi=0.99,
                                   doc="final fraction of surviving weights zeroed")
    schedule_start: float = _f(0.5, lo=0.0, hi=1.0,
                               doc="targets at round 1, as a fraction of the final ones")
    schedule_rounds: int = _f(10, lo=1, doc="T of the cubic schedule: final targets from here")
    mask_every: int = _f(2, lo=1, doc="recompute the mask every N rounds")
    guidance_decay: float = _f(0.9, lo=0.0, hi=1.0, doc="beta: G <- beta G + (1-beta) minmax(...)")
    min_units: int = _f(1, lo=1, doc="units every prunable layer keeps")
    warmup_rounds: int = _f(0, lo=0, doc="no mask before round warmup_rounds + 1 (0 = "
                                         "prune from round 1)")
    start_when: str = _f("warmup", choices=("warmup", "improved"),
                         doc="warmup: the first mask right after the warm-up; improved: after "
                             "it, once the server's test loss fell pruning.patience rounds in "
                             "a row. The cubic schedule runs from the first mask")
    patience: int = _f(2, lo=1, doc="start_when=improved: rounds in a row the loss must fall")
    quantize: bool = _f(False, doc="send kept values as per-block int8")


@dataclass
class DiagnosticsConfig:
    decomposition_every: int = _f(0, lo=0, doc="FedLD loss decomposition every N rounds (0 = off)")
    guidance_every: int = _f(0, lo=0, doc="guidance quality (oracle unit removals against "
                                          "guidance, magnitude, random) every N rounds (0 = off)")
    guidance_units: int = _f(16, lo=2, hi=4096,
                             doc="guidance quality: units sampled per group (seeded)")


@dataclass
class ResourcesConfig:
    client_cpus: int = _f(1, lo=1, doc="CPUs per simulated client (whole numbers)")
    client_gpus: float = _f(0.0, lo=0.0, hi=1.0, doc="GPU fraction per client")
    device: str = _f("auto", choices=("auto", "cpu", "cuda"))


#: how a worker trains its clients (fl.cohort.MODES; tests/test_cohorts.py keeps them equal)
COHORT_MODES = ("auto", "sequential", "vectorised")
OVERLAP_CHOICES = ("auto", "always", "never")


@dataclass
class SimulationConfig:
    """Cohort mode (simulation only; deployment keeps one client per node): a few worker
    SuperNodes each train many sampled clients per message (server/cohorts.py)."""

    cohort_size: int = _f(0, lo=0, hi=100_000,
                          doc="0 = one client per message; N > 0: cohort mode, at most N "
                              "clients per vectorised cohort on a worker")
    workers: int = _f(0, lo=0, hi=100_000,
                      doc="cohort mode: worker SuperNodes (0 = from the hardware: one per "
                          "CPU core, or 1/resources.client_gpus per GPU)")
    cohort_mode: str = _f("auto", choices=COHORT_MODES,
                          doc="cohort mode: how a worker trains its clients (auto: one after "
                              "another on a CPU, vectorised on a GPU)")
    overlap_evaluation: str = _f("auto", choices=OVERLAP_CHOICES,
                                 doc="evaluate round r on the server while round r + 1 "
                                     "trains (auto: in cohort mode when the server "
                                     "evaluates on a GPU; server/rounds.py)")

    def overlaps_evaluation(self, device: str) -> bool:
        """Whether the round loop evaluates beside the next round's training, the server
        evaluating on ``device`` (a torch device type). ``auto`` overlaps only in cohort
        mode on a GPU: on a CPU the evaluation takes every core (fl.train.evaluate's
        threads), and beside the workers it made rounds slower, not faster
        (docs/RESULTS.md, "Client cohorts")."""
        return (self.overlap_evaluation == "always"
                or (self.overlap_evaluation == "auto" and self.cohort_size > 0
                    and device == "cuda"))


@dataclass
class TrackingConfig:
    """Experiment trackers the server logs to (fl/tracking): any combination, none by
    default. Flat scalar keys, since Flower's run config carries only scalars."""

    tensorboard: bool = _f(False, doc="write TensorBoard event files (pip extra: tensorboard)")
    tensorboard_dir: str = _f("", doc="event-file folder, a subfolder per run (default: "
                              "RUN_DIR/tensorboard)")
    wandb_project: str = _f("", doc="Weights & Biases project; empty = off (pip extra: wandb)")
    wandb_entity: str = _f("", doc="W&B team or user (empty: your default entity)")
    wandb_mode: str = _f("online", choices=WANDB_MODES,
                         doc="offline: the run stays on disk until `wandb sync`")
    wandb_tags: str = _f("", doc="W&B tags, comma-separated")
    mlflow_uri: str = _f("", doc="MLflow tracking URI, e.g. sqlite:///mlruns.db or "
                         "http://host:5000; empty = off (pip extra: mlflow)")
    mlflow_experiment: str = _f("", doc="MLflow experiment (default: name; a sweep: the "
                                "study's name)")
    group: str = _f("", doc="W&B group and MLflow tag of related runs (bonsai sweep: the "
                    "study's name)")
    cell: str = _f("", doc="set by bonsai sweep: the cell's choices, AXIS=CHOICE,...")

    def enabled(self) -> tuple[str, ...]:
        """The trackers this config turns on, in a fixed order."""
        return tuple(name for name, on in (("tensorboard", self.tensorboard),
                                           ("wandb", bool(self.wandb_project)),
                                           ("mlflow", bool(self.mlflow_uri))) if on)


@dataclass
class ExperimentConfig:
    name: str = _f("quickstart", path_component=True,
                   doc="results go to OUTPUT_DIR/NAME-TIMESTAMP: one folder name")
    seed: int = _f(0, lo=0)
    rounds: int = _f(30, lo=1, hi=100_000)
    model: str = _f("cnn", choices=("mlp", "cnn", "resnet8", "cnn_fedavg", "cnn_leaf", "lenet",
                                    "resnet18_gn", "char_lstm"),
                    doc="see README (models and their papers)")
    output_dir: str = _f("results", doc="results go to OUTPUT_DIR/NAME-TIMESTAMP")
    run_dir: str = _f("", doc="this run's folder (set by `bonsai run`; empty = derived)")
    resume: bool = _f(False, doc="continue from run_dir's checkpoint (bonsai run --resume)")
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    pruning: PruningConfig = field(default_factory=PruningConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)


def _leaves(cls: type, prefix: str = "") -> dict[str, dataclasses.Field]:
    out: dict[str, dataclasses.Field] = {}
    for f in fields(cls):
        if dataclasses.is_dataclass(f.default_factory if callable(f.default_factory) else None):
            out.update(_leaves(f.default_factory, prefix + f.name + "."))  # type: ignore[arg-type]
        else:
            out[prefix + f.name] = f
    return out


#: every config key as a flat dotted name -> its dataclass field
FIELDS: dict[str, dataclasses.Field] = _leaves(ExperimentConfig)


def to_flat(cfg: ExperimentConfig) -> dict[str, Scalar]:
    """Flatten to dotted keys (the Flower run-config form)."""
    out: dict[str, Scalar] = {}
    for key in FIELDS:
        obj: Any = cfg
        for part in key.split("."):
            obj = getattr(obj, part)
        out[key] = obj
    return out


def _set(cfg: ExperimentConfig, key: str, value: Any) -> None:
    *path, last = key.split(".")
    obj: Any = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, last, value)


def _coerce(key: str, value: Any, problems: list[str]) -> Any:
    want = type(FIELDS[key].default)
    is_bool = isinstance(value, bool)
    if want is float and isinstance(value, int) and not is_bool:
        return float(value)
    if isinstance(value, want) and (want is bool or not is_bool):
        return value
    problems.append(f"{key}: got {shown(value)} ({type(value).__name__}); expected "
                    f"{want.__name__}")
    return None


def _check_range(key: str, value: Any, problems: list[str]) -> None:
    m = FIELDS[key].metadata
    if m.get("auto") is not None and value == m["auto"]:
        return
    if m.get("choices") and value not in m["choices"]:
        allowed = ", ".join(map(str, m["choices"]))
        problems.append(f"{key}: got {shown(value)}; allowed: {clip(allowed, 400)}")
        return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if isinstance(value, float) and not math.isfinite(value):
            problems.append(f"{key}: got {shown(value)}; expected a finite number")
            return
        lo, hi = m.get("lo"), m.get("hi")
        auto = f", or {m['auto']} (auto)" if m.get("auto") is not None else ""
        if lo is not None and (value < lo or (m.get("lo_open") and value == lo)):
            op = ">" if m.get("lo_open") else ">="
            problems.append(f"{key}: got {shown(value)}; allowed: {op} {lo}{auto}")
        elif hi is not None and value > hi:
            problems.append(f"{key}: got {shown(value)}; allowed: <= {hi}{auto}")
    if m.get("path_component") and isinstance(value, str):
        problem = path_component_problem(key, value)
        if problem:
            problems.append(problem)


#: keys that say where a run is written, not what it computes: a resumed run may differ in them
PLACE_KEYS = frozenset({"output_dir", "run_dir", "resume"})
#: sections that say where a run is reported, not what it computes: they may differ too
#: (a run resumed with a tracker turned on, a sweep cell finished before tracking was)
PLACE_SECTIONS = frozenset({"tracking"})


def is_place_key(key: str) -> bool:
    """True for a flat key that does not change what a run computes (:data:`PLACE_KEYS`,
    :data:`PLACE_SECTIONS`): resuming, and a study's finished cells, ignore it."""
    return key in PLACE_KEYS or key.split(".", 1)[0] in PLACE_SECTIONS


def config_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """``key: old -> new`` for each flat key present in both with another value, the
    place keys aside (:func:`is_place_key`; keys only one side knows are from another
    version)."""
    return [f"{k}: {shown(old[k], 40)} -> {shown(new[k], 40)}" for k in new
            if k in old and not is_place_key(k) and old[k] != new[k]]


def parse_override(text: str) -> tuple[str, Any]:
    """``"partition.alpha=0.1"`` -> ``("partition.alpha", 0.1)`` (value parsed as YAML)."""
    if "=" not in text:
        raise ConfigError([f"--set {shown(text)}: expected KEY=VALUE, e.g. rounds=20"])
    key, raw = text.split("=", 1)
    try:
        value = parse_yaml(raw, f"--set {clip(key.strip())}") if raw.strip() else ""
    except YamlSyntaxError:
        value = raw
    except YamlFileError as e:  # a repeated key or an alias bomb in the value
        raise ConfigError([str(e)]) from None
    return key.strip(), value


def build(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config from flat dotted keys; raise ConfigError listing
    every problem (unknown key, wrong type, out of range, inconsistent pair)."""
    problems: list[str] = []
    cfg = ExperimentConfig()
    unknown = 0
    for key, value in values.items():
        if key not in FIELDS:
            unknown += 1
            if unknown > MAX_UNKNOWN_SHOWN:
                continue
            near = difflib.get_close_matches(key, FIELDS, n=1) if len(key) <= 100 else []
            hint = f"; did you mean {near[0]}?" if near else ""
            problems.append(f"{clip(key, 100)}: unknown key{hint} (see `bonsai keys`)")
            continue
        v = _coerce(key, value, problems)
        if v is None:
            continue
        _check_range(key, v, problems)
        _set(cfg, key, v)
    if unknown > MAX_UNKNOWN_SHOWN:
        problems.append(f"... and {unknown - MAX_UNKNOWN_SHOWN} more unknown keys")
    if not problems:
        problems.extend(_cross_checks(cfg))
        problems.extend(_tracking_checks(cfg.tracking))
    if problems:
        raise ConfigError(problems)
    _resolve_tracking_paths(cfg.tracking)
    if cfg.dataset.path and cfg.dataset.name in ("npz", "local"):
        # absolute, so that every process of the run (Ray's workers start elsewhere) and
        # the data cache's key name the same file
        cfg.dataset.path = os.path.abspath(os.path.expanduser(cfg.dataset.path))
    _resolve_auto(cfg)
    return cfg


def uses_fedld(cfg: ExperimentConfig) -> bool:
    """True when FedLD is the strategy or the aggregation rule inside a pruning strategy."""
    s = cfg.strategy
    return s.name == "fedld" or (s.name in ("autoflip", "random", "magnitude")
                                 and s.aggregation == "fedld")


def _resolve_auto(cfg: ExperimentConfig) -> None:
    """Replace "auto" values by what they mean for this config (docs/ALGORITHMS.md §2.2):
    FedLD's margin control is on (lambda 0.1) wherever FedLD runs, unless set."""
    if cfg.objective.margin_lambda == AUTO_MARGIN:
        cfg.objective.margin_lambda = FEDLD_MARGIN_LAMBDA if uses_fedld(cfg) else 0.0


def proximal_mu(cfg: ExperimentConfig) -> float:
    """The FedProx mu the clients add (docs/ALGORITHMS.md §3): ``strategy.proximal_mu``
    under fedprox or with ``strategy.prox``, else 0."""
    s = cfg.strategy
    return s.proximal_mu if (s.name == "fedprox" or s.prox) else 0.0


#: models that take (channels, height, width) float inputs (fl.models builds them)
IMAGE_MODELS = frozenset({"cnn", "resnet8", "cnn_fedavg", "cnn_leaf", "lenet", "resnet18_gn"})
#: models that take int64 token ids of shape (sequence length,) per example
TEXT_MODELS = frozenset({"char_lstm"})
#: smallest height and width an image model accepts: its pooling needs at least this
#: (lenet: two 5x5 'valid' convolutions and two 2x2 pools, 16 -> 12 -> 6 -> 2 -> 1)
MIN_IMAGE_SIZE = {"cnn": 2, "cnn_fedavg": 4, "cnn_leaf": 4, "lenet": 16, "resnet8": 1,
                  "resnet18_gn": 1}
#: input shape of one example of the bundled datasets, known without loading them
BUNDLED_INPUT_SHAPES: dict[str, tuple[int, ...]] = {"digits": (1, 8, 8), "synthetic": (60,)}


def requires_image(name: str) -> bool:
    """True for models that need (channels, height, width) inputs."""
    return name in IMAGE_MODELS


def requires_tokens(name: str) -> bool:
    """True for models that take int64 token ids (N, sequence length), not floats."""
    return name in TEXT_MODELS


def input_problem(model: str, input_shape: tuple[int, ...]) -> str | None:
    """Why ``model`` cannot take examples of ``input_shape``, or None.

    The phrase follows the model's name, e.g. ``needs images of at least 16x16,
    got 8x8``. The one place for the model/input rules: the config checks, the
    data checks before a run and the model constructors (fl.models) all ask it.
    """
    shape = tuple(int(s) for s in input_shape)
    if requires_image(model):
        if len(shape) != 3:
            return f"needs image inputs (channels, height, width), got shape {shape}"
        least = MIN_IMAGE_SIZE.get(model, 1)
        if min(shape[1:]) < least:
            return f"needs images of at least {least}x{least}, got {shape[1]}x{shape[2]}"
    if requires_tokens(model) and (len(shape) != 1 or shape[0] < 1):
        return f"needs token-id sequences of shape (sequence length,), got shape {shape}"
    return None


def _cross_checks(cfg: ExperimentConfig) -> list[str]:
    p: list[str] = []
    n = cfg.partition.num_clients
    if n == 0 and cfg.partition.kind != "natural":
        p.append(f"partition.num_clients: got 0; allowed: >= 1 (0, one client per id of the "
                 f"data, needs partition.kind=natural; got {cfg.partition.kind!r})")
    if n and cfg.simulation.cohort_size and cfg.simulation.workers > n:
        p.append(f"simulation.workers: got {cfg.simulation.workers}; allowed: <= "
                 f"partition.num_clients ({n}) (a worker trains clients)")
    if n and cfg.strategy.min_train_clients > n:
        p.append(f"strategy.min_train_clients: got {cfg.strategy.min_train_clients}; "
                 f"allowed: <= partition.num_clients ({n})")
    if cfg.dataset.name == "synthetic" and cfg.model != "mlp":
        p.append(f"model: got {cfg.model!r}; the synthetic dataset is vectors, allowed: mlp")
    elif cfg.dataset.name in BUNDLED_INPUT_SHAPES:
        problem = input_problem(cfg.model, BUNDLED_INPUT_SHAPES[cfg.dataset.name])
        if problem:
            p.append(f"model: got {cfg.model!r}; {cfg.model} {problem} (dataset.name="
                     f"{cfg.dataset.name})")
    if cfg.dataset.name == "npz" and not cfg.dataset.path:
        p.append("dataset.path: got ''; dataset.name=npz needs the path of an .npz file")
    if cfg.dataset.name == "local" and not cfg.dataset.path:
        p.append("dataset.path: got ''; dataset.name=local needs a data file or folder")
    if cfg.dataset.name == "hf" and not cfg.dataset.hf_name:
        p.append("dataset.hf_name: got ''; dataset.name=hf needs a Hugging Face dataset id")
    if cfg.dataset.name == "synthetic":
        for key, on in (("dataset.normalize", cfg.dataset.normalize),
                        ("train.augment_crop_padding", cfg.train.augment_crop_padding > 0),
                        ("train.augment_flip", cfg.train.augment_flip)):
            if on:
                p.append(f"{key}: got {shown(_value(cfg, key))}; the synthetic dataset is "
                         "vectors, not images")
    if cfg.resume and not cfg.run_dir:
        p.append("resume: got True; set by `bonsai run FILE --resume RESULTS_DIR` (it needs "
                 "the run's folder), not in a file or --set")
    if cfg.partition.kind == "natural" and cfg.dataset.name in ("digits", "npz"):
        p.append(f"partition.kind: got 'natural'; dataset.name={cfg.dataset.name} has no client "
                 "ids (synthetic has its devices; local and hf datasets a partition column)")
    return p


#: characters a W&B project name must not hold (W&B refuses them)
_WANDB_PROJECT_BAD = "/\\#?%:"
#: W&B's longest tag and project name
_WANDB_TAG_MAX, _WANDB_PROJECT_MAX = 64, 128


def tag_list(tracking: TrackingConfig) -> list[str]:
    """``tracking.wandb_tags`` as a list (comma-separated, blanks dropped)."""
    return [t.strip() for t in tracking.wandb_tags.split(",") if t.strip()]


def _tracking_checks(t: TrackingConfig) -> list[str]:
    p: list[str] = []
    if t.tensorboard_dir and not t.tensorboard:
        p.append(f"tracking.tensorboard_dir: got {shown(t.tensorboard_dir)}; it needs "
                 "tracking.tensorboard: true")
    if not t.wandb_project:
        for key, value, default in (("wandb_entity", t.wandb_entity, ""),
                                    ("wandb_tags", t.wandb_tags, ""),
                                    ("wandb_mode", t.wandb_mode, "online")):
            if value != default:
                p.append(f"tracking.{key}: got {shown(value)}; it needs "
                         "tracking.wandb_project (W&B is off without a project)")
    elif any(ch in t.wandb_project for ch in _WANDB_PROJECT_BAD) or \
            len(t.wandb_project) > _WANDB_PROJECT_MAX:
        p.append(f"tracking.wandb_project: got {shown(t.wandb_project)}; allowed: at most "
                 f"{_WANDB_PROJECT_MAX} characters, none of {' '.join(_WANDB_PROJECT_BAD)}")
    long_tags = [tag for tag in tag_list(t) if len(tag) > _WANDB_TAG_MAX]
    if long_tags:
        p.append(f"tracking.wandb_tags: tag {shown(long_tags[0])} is longer than "
                 f"{_WANDB_TAG_MAX} characters (W&B's limit)")
    if t.mlflow_experiment and not t.mlflow_uri:
        p.append(f"tracking.mlflow_experiment: got {shown(t.mlflow_experiment)}; it needs "
                 "tracking.mlflow_uri")
    scheme = _uri_scheme(t.mlflow_uri)
    if scheme and scheme not in MLFLOW_SCHEMES:
        p.append(f"tracking.mlflow_uri: got {shown(t.mlflow_uri)}; allowed: a folder, or a URI "
                 f"of {', '.join(MLFLOW_SCHEMES)} (other databases: behind `mlflow server`)")
    elif scheme in ("http", "https") and not t.mlflow_uri.split("://", 1)[-1].strip("/"):
        p.append(f"tracking.mlflow_uri: got {shown(t.mlflow_uri)}; expected a server, e.g. "
                 "http://127.0.0.1:5000")
    elif scheme == "sqlite" and not t.mlflow_uri.startswith("sqlite:///"):
        p.append(f"tracking.mlflow_uri: got {shown(t.mlflow_uri)}; expected "
                 "sqlite:///FILE.db (relative) or sqlite:////ABSOLUTE/FILE.db")
    return p


def _uri_scheme(uri: str) -> str:
    """The scheme of an MLflow tracking URI ('' for a plain folder; ``databricks`` alone
    is one, as MLflow reads it)."""
    if uri == "databricks":
        return uri
    return uri.split(":", 1)[0] if ":" in uri else ""


def _resolve_tracking_paths(t: TrackingConfig) -> None:
    """Make local tracking paths absolute against the current folder: the ServerApp
    runs elsewhere (a simulation: in a private temporary folder), and the folder the
    user typed the command in is what a relative path means. Absolute ones stay."""
    if t.tensorboard_dir:
        t.tensorboard_dir = str(Path(t.tensorboard_dir).expanduser().resolve())
    uri = t.mlflow_uri
    if uri.startswith("sqlite:///") and uri[len("sqlite:///"):] not in ("", ":memory:"):
        t.mlflow_uri = "sqlite:///" + str(Path(uri[len("sqlite:///"):]).expanduser().resolve())
    elif uri.startswith("file:") and not uri.startswith("file:///"):
        t.mlflow_uri = Path(uri[len("file:"):].removeprefix("//")).expanduser().resolve(
            ).as_uri()
    elif uri and not _uri_scheme(uri):  # a plain folder: MLflow's file store
        t.mlflow_uri = str(Path(uri).expanduser().resolve())


def _value(cfg: ExperimentConfig, key: str) -> Any:
    obj: Any = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def load(path: str | Path | None = None, overrides: Iterable[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file, apply ``KEY=VALUE`` overrides, validate."""
    values: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"experiment file: {str(p)!r} does not exist"])
        try:
            data = load_yaml(p, f"experiment file {str(p)!r}")
        except YamlFileError as e:
            raise ConfigError([str(e)]) from None
        if data is None or data == {}:  # an empty file must not run the defaults silently
            raise ConfigError([f"experiment file {str(p)!r} is empty (no keys); give at least "
                               "one key, e.g. rounds: 30"])
        if not isinstance(data, Mapping):
            raise ConfigError([f"experiment file {str(p)!r}: expected a mapping of keys"])
        values.update(flatten(data))
    for text in overrides:
        k, v = parse_override(text)
        values[k] = v
    return build(values)


def from_flat(run_config: Mapping[str, Any]) -> ExperimentConfig:
    """Build from a Flower run config (``context.run_config``); extra keys are errors."""
    return build(dict(run_config))


def to_json(cfg: ExperimentConfig) -> str:
    return json.dumps(dataclasses.asdict(cfg), indent=2, sort_keys=True)


def describe() -> list[tuple[str, str, str]]:
    """(key, default, allowed / meaning) for every key: what `bonsai keys` prints."""
    rows = []
    for key, f in FIELDS.items():
        m = f.metadata
        allowed = m.get("doc") or ""
        if m.get("choices"):
            allowed = " | ".join(map(str, m["choices"])) + (f"  ({m['doc']})" if m["doc"] else "")
        default = repr(f.default) + (" (auto)" if m.get("auto") == f.default else "")
        rows.append((key, default, allowed))
    return rows
