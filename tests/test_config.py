"""Experiment config: loading, overrides, validation of every bad-input class."""

import json
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from fl import config as c

ROOT = Path(__file__).resolve().parent.parent


def problems(*overrides: str) -> list[str]:
    with pytest.raises(c.ConfigError) as e:
        c.load(None, overrides)
    return e.value.problems


def test_defaults_and_overrides():
    cfg = c.load(None, ["rounds=20", "partition.alpha=0.1", "train.lr=1"])
    assert cfg.rounds == 20 and cfg.partition.alpha == 0.1
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)  # int accepted for float


def test_unknown_key_names_key_and_suggests():
    (line,) = problems("partition.alpa=0.3")
    assert line.startswith("partition.alpa: unknown key") and "partition.alpha" in line


@pytest.mark.parametrize("override, expect", [
    ("rounds=abc", "rounds: got 'abc' (str); expected int"),
    ("rounds=true", "rounds: got True (bool); expected int"),
    ("seed=1.5", "seed: got 1.5 (float); expected int"),
    ("rounds=0", "rounds: got 0; allowed: >= 1"),
    ("partition.alpha=0", "partition.alpha: got 0.0; allowed: > 0.0"),
    ("strategy.fraction_train=1.5", "strategy.fraction_train: got 1.5; allowed: <= 1.0"),
    ("model=vgg", "model: got 'vgg'; allowed: mlp, cnn, resnet8, cnn_fedavg, cnn_leaf, "
                  "lenet, resnet18_gn, char_lstm"),
    ("train.lr=.nan", "train.lr: got nan; expected a finite number"),
])
def test_bad_type_range_choice(override, expect):
    assert problems(override) == [expect]


def test_every_problem_reported_at_once():
    assert len(problems("rounds=0", "model=vgg", "nope=1")) == 3


def test_cross_field_checks():
    (line,) = problems("strategy.min_train_clients=20")
    assert "partition.num_clients (10)" in line
    (line,) = problems("dataset.name=synthetic")
    assert line.startswith("model: got 'cnn'")
    (line,) = problems("dataset.name=npz")
    assert line.startswith("dataset.path")


def test_yaml_file_errors(tmp_path):
    with pytest.raises(c.ConfigError, match="does not exist"):
        c.load(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(c.ConfigError, match="not valid YAML"):
        c.load(bad)
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(c.ConfigError, match="expected a mapping"):
        c.load(bad)


def test_flat_round_trip():
    cfg = c.load(None, ["partition.kind=iid", "strategy.name=fedprox"])
    assert c.from_flat(c.to_flat(cfg)) == cfg


def test_pyproject_defaults_match_schema():
    """`flwr run .` and `bonsai run` must read the same keys and defaults."""
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    from flwr.common.config import flatten_dict

    flat = flatten_dict(data["tool"]["flwr"]["app"]["config"])
    assert flat == c.to_flat(c.ExperimentConfig())


def _absent_data(f: Path) -> str | None:
    """The local dataset path a shipped file points at when it is not here (the
    benchmark studies point at a user's copy of CIFAR-10, FEMNIST, Shakespeare)."""
    import yaml

    data = yaml.safe_load(f.read_text()) or {}
    ds = (data.get("base", data) or {}).get("dataset", {}) or {}
    if ds.get("name") != "local":
        return None
    path = (ROOT / ds["path"]).resolve()
    return None if path.exists() else str(path)


#: the benchmark studies (issue 13): they run on a local copy of a hub dataset
BENCHMARKS = {"cifar10_dir05_lenet.yaml": "uoft-cs/cifar10",
              "cifar10_dir01_resnet18gn.yaml": "uoft-cs/cifar10",
              "femnist_writers_cnnleaf.yaml": "flwrlabs/femnist",
              "shakespeare_roles_charlstm.yaml": "flwrlabs/shakespeare"}


def test_every_shipped_experiment_file_validates():
    """Every shipped file validates, data included; a file whose local dataset is not
    on this machine validates with --no-data-check and otherwise says exactly that."""
    import yaml

    files = [f for f in sorted((ROOT / "simulations").glob("*.yaml"))
             if "grid" not in (yaml.safe_load(f.read_text()) or {})]  # studies: test_sweep
    assert files, "simulations/ has no experiment files"
    every = sorted((ROOT / "simulations").glob("*.yaml"))  # studies validate cell by cell
    for f in every:
        assert f.read_text().startswith("# bonsai "), f"{f.name}: first line must be its command"
    assert set(BENCHMARKS) <= {f.name for f in every}
    absent = {f: p for f in every if (p := _absent_data(f))}
    present = [f for f in every if f not in absent]
    out = subprocess.run([sys.executable, "-m", "fl.cli", "validate", *map(str, present)],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(": ok (study,") == len(present) - len(set(files) & set(present))
    if not absent:
        return
    keys = subprocess.run([sys.executable, "-m", "fl.cli", "validate", "--no-data-check",
                           *map(str, absent)], capture_output=True, text=True, cwd=ROOT)
    assert keys.returncode == 0, keys.stderr
    assert keys.stdout.count(": ok (study,") == len(absent)
    for f, path in absent.items():
        rel = f"simulations/{f.name}"
        out = subprocess.run([sys.executable, "-m", "fl.cli", "validate", rel],
                             capture_output=True, text=True, cwd=ROOT)
        hub = BENCHMARKS[f.name]
        assert out.returncode == 2 and out.stdout == ""
        assert out.stderr.splitlines() == [
            f"bonsai: error: {rel}: dataset.path: {path!r} does not exist; it should hold a "
            f"local copy of {hub} (README, 'Benchmark datasets'): hf download {hub} "
            f"--repo-type dataset --local-dir {path}, or read the hub with --set "
            "dataset.name=hf (dataset local) (cell strategy=fedavg,seed=0)"]


def test_benchmark_studies_open_with_their_command_and_published_figure():
    for name, hub in BENCHMARKS.items():
        text = (ROOT / "simulations" / name).read_text()
        assert text.splitlines()[0] == f"# bonsai sweep simulations/{name}"
        assert "Published" in text or "published figure" in text, name
        assert f"hf_name: {hub}" in text and "--set dataset.name=hf" in text
        for strategy in ("fedavg:", "fedprox:", "fedld:", "autoflip:", "autoflip+fedld:"):
            assert f"    {strategy} " in text, (name, strategy)


def test_cli_bad_input_is_one_line_and_exit_2():
    out = subprocess.run(
        [sys.executable, "-m", "fl.cli", "validate", "simulations/quickstart.yaml",
         "--set", "partition.alpha=-1"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2
    assert out.stderr.strip() == "bonsai: error: partition.alpha: got -1.0; allowed: > 0.0"
    out = subprocess.run([sys.executable, "-m", "fl.cli", "run", "simulations/quickstart.yaml",
                          "--set", "rounds"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 2 and "expected KEY=VALUE" in out.stderr


@pytest.mark.parametrize("overrides, expect", [
    (("model=lenet",), "model: got 'lenet'; lenet needs images of at least 16x16, got 8x8 "
                       "(dataset.name=digits)"),
    (("model=char_lstm",), "model: got 'char_lstm'; char_lstm needs token-id sequences of "
                           "shape (sequence length,), got shape (1, 8, 8) (dataset.name=digits)"),
    (("model=cnn_leaf", "dataset.name=synthetic"),
     "model: got 'cnn_leaf'; the synthetic dataset is vectors, allowed: mlp"),
])
def test_model_that_cannot_take_the_datasets_examples(overrides, expect):
    assert problems(*overrides) == [expect]


def test_models_that_fit_digits_and_any_model_on_a_file_validate():
    for model in ("cnn_fedavg", "cnn_leaf", "resnet18_gn", "cnn", "resnet8", "mlp"):
        assert c.load(None, [f"model={model}"]).model == model
    # an .npz's shape is known only once it is read: checked before the run (fl.study)
    assert c.load(None, ["model=lenet", "dataset.name=npz", "dataset.path=x.npz"]).model == "lenet"


def test_input_rules():
    assert c.requires_tokens("char_lstm") and not c.requires_tokens("lenet")
    assert c.requires_image("resnet18_gn") and not c.requires_image("char_lstm")
    assert c.input_problem("lenet", (3, 32, 32)) is None
    assert c.input_problem("lenet", (3, 16, 16)) is None
    assert c.input_problem("lenet", (3, 15, 32)) == "needs images of at least 16x16, got 15x32"
    assert c.input_problem("char_lstm", (80,)) is None
    assert c.input_problem("mlp", (60,)) is None


def test_validate_says_it_in_one_line():
    proc = subprocess.run([sys.executable, "-m", "fl.cli", "validate",
                           "simulations/quickstart.yaml", "--set", "model=lenet"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [
        "bonsai: error: model: got 'lenet'; lenet needs images of at least 16x16, got 8x8 "
        "(dataset.name=digits)"]


@pytest.mark.parametrize("overrides, expect", [
    (("strategy.name=fedld",), 0.1),
    (("strategy.name=autoflip", "strategy.aggregation=fedld"), 0.1),
    (("strategy.name=random", "strategy.aggregation=fedld"), 0.1),
    (("strategy.name=magnitude", "strategy.aggregation=fedld"), 0.1),
    (("strategy.name=autoflip",), 0.0),
    (("strategy.name=fedavg",), 0.0),
    (("strategy.name=fedavg", "strategy.aggregation=fedld"), 0.0),  # no rule inside fedavg
    (("strategy.name=fedld", "objective.margin_lambda=0"), 0.0),  # set: stays 0
    (("strategy.name=fedld", "objective.margin_lambda=0.3"), 0.3),
    (("strategy.name=autoflip", "objective.margin_lambda=0.2"), 0.2),
    (("strategy.name=fedld", "objective.margin_lambda=-1"), 0.1),  # -1 is auto
])
def test_margin_lambda_is_on_wherever_fedld_runs_unless_set(overrides, expect):
    """docs/ALGORITHMS.md §2.2: FedLD's margin control (0.1) is the default under FedLD."""
    cfg = c.load(None, overrides)
    assert cfg.objective.margin_lambda == expect
    # config.json and the Flower run config hold the resolved value, and rebuild to it
    assert json.loads(c.to_json(cfg))["objective"]["margin_lambda"] == expect
    assert c.from_flat(c.to_flat(cfg)) == cfg


def test_margin_lambda_auto_is_documented_and_other_negatives_refused():
    (line,) = problems("objective.margin_lambda=-0.5")
    assert line == "objective.margin_lambda: got -0.5; allowed: >= 0.0, or -1.0 (auto)"
    row = next(r for r in c.describe() if r[0] == "objective.margin_lambda")
    assert row[1] == "-1.0 (auto)" and "0.1 when FedLD is the strategy" in row[2]


@pytest.mark.parametrize("overrides, expect", [
    (("strategy.name=autoflip",), 0.0),  # the quickstart: no FedProx unless asked
    (("strategy.name=fedprox",), 0.01),
    (("strategy.name=fedprox", "strategy.proximal_mu=0.2"), 0.2),
    (("strategy.name=autoflip", "strategy.prox=true"), 0.01),
    (("strategy.name=fedld", "strategy.prox=true", "strategy.proximal_mu=0.5"), 0.5),
    (("strategy.name=fedavg", "strategy.proximal_mu=0.5"), 0.0),
])
def test_proximal_mu_under_fedprox_or_with_prox(overrides, expect):
    assert c.proximal_mu(c.load(None, overrides)) == expect
