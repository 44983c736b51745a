"""Issue 19, items 4, 5, 7, 9, 10 and 11: input a careless or hostile user gives ends in
one ``bonsai: error:`` line and exit code 2 before anything starts or is written
(or works correctly). CLI tests run ``python -m fl.cli`` in a subprocess from the
repository root; none of them starts Flower."""

from __future__ import annotations

import io
import json
import os
import pickle
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fl import config as c
from fl.yamlfile import MAX_VALUES, YamlFileError, YamlSyntaxError, load_yaml, parse_yaml

ROOT = Path(__file__).resolve().parent.parent


def bonsai(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl.cli", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout)


def one_error(out: subprocess.CompletedProcess, *needles: str) -> str:
    """Exit 2, exactly one ``bonsai: error:`` line holding every needle, no traceback."""
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("bonsai: error: ")]
    assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
    assert "Traceback" not in out.stderr, out.stderr[-2000:]
    assert len(errors) == 1, out.stderr[-2000:]
    for needle in needles:
        assert needle in errors[0], (needle, errors[0])
    return errors[0]


def npz(path: Path, x: np.ndarray, y: np.ndarray, **extra) -> Path:
    np.savez(path, x=x, y=y, **extra)
    return path


@pytest.fixture
def vectors(tmp_path) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((200, 64), dtype=np.float32), np.arange(200) % 10


QUICK = "simulations/quickstart.yaml"


# --- item 4: duplicate YAML keys ---------------------------------------------------------------
def test_a_second_section_is_an_error_naming_the_key_and_both_lines(tmp_path):
    f = tmp_path / "exp.yaml"
    f.write_text("rounds: 3\npartition:\n  num_clients: 4\nseed: 1\npartition:\n  kind: iid\n")
    one_error(bonsai("validate", f), "partition: defined twice, lines 2 and 5")
    out = tmp_path / "out"
    one_error(bonsai("run", f, "--set", f"output_dir={out}"), "partition: defined twice")
    assert not out.exists()


def test_a_study_choice_named_twice_is_an_error(tmp_path):
    study = tmp_path / "study.yaml"
    study.write_text(f"name: dup\noutput_dir: {tmp_path / 'studies'}\nbase: {{rounds: 2}}\n"
                     "grid:\n  strategy:\n    fedavg: {strategy.name: fedavg}\n"
                     "    fedavg: {strategy.name: fedprox}\n")
    one_error(bonsai("validate", study), "fedavg: defined twice, lines 6 and 7")
    one_error(bonsai("sweep", study, "--dry-run"), "fedavg: defined twice, lines 6 and 7")
    assert not (tmp_path / "studies").exists()


def test_duplicates_on_one_line_and_in_set_values():
    with pytest.raises(YamlFileError, match="a: defined twice, line 1, columns 2 and 8"):
        parse_yaml("{a: 1, a: 2}", "x")
    with pytest.raises(c.ConfigError, match="name: defined twice"):
        c.load(None, ["strategy={name: fedavg, name: fedprox}"])


def test_merge_keys_may_be_overridden_and_nested_merges_are_not_duplicates():
    text = ("defs:\n  base: &b {a: 1, b: 2}\n  x: &x {<<: *b, a: 3}\n"
            "y: {<<: *x, b: 4}\nz: {<<: [*x, *b]}\n")
    assert parse_yaml(text, "t") == {"defs": {"base": {"a": 1, "b": 2}, "x": {"a": 3, "b": 2}},
                                     "y": {"a": 3, "b": 4}, "z": {"a": 3, "b": 2}}


def test_every_yaml_read_goes_through_the_one_loader():
    """No module calls PyYAML's loaders directly: duplicates and aliases are checked once."""
    offenders = [str(p.relative_to(ROOT)) for d in ("fl", "server", "clients", "strategies")
                 for p in (ROOT / d).rglob("*.py") if p.name != "yamlfile.py"
                 and any(s in p.read_text() for s in ("yaml.safe_load", "yaml.load(",
                                                     "yaml.SafeLoader", "yaml.full_load"))]
    assert offenders == []


# --- item 9: alias bombs, and cheap unknown-key hints --------------------------------------
def _bomb() -> str:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for i in range(8):
        prev, cur = chr(97 + i), chr(98 + i)
        lines.append(f"{cur}: &{cur} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once(tmp_path):
    f = tmp_path / "bomb.yaml"
    f.write_text(_bomb())
    assert len(f.read_bytes()) < 520
    t0 = time.perf_counter()
    one_error(bonsai("validate", f, timeout=60), "holds 490,329,064 values",
              "allowed: at most 10,000")
    assert time.perf_counter() - t0 < 60
    one_error(bonsai("sweep", f, timeout=60), "allowed: at most 10,000")


def test_the_value_limit_counts_every_alias_use_exactly():
    ok = "k: [" + ",".join(["0"] * (MAX_VALUES - 3)) + "]"  # root, key, list, items
    assert len(parse_yaml(ok, "t")["k"]) == MAX_VALUES - 3
    with pytest.raises(YamlFileError, match=f"holds {MAX_VALUES + 1:,} values"):
        parse_yaml("k: [" + ",".join(["0"] * (MAX_VALUES - 2)) + "]", "t")
    # root + 3 x (key + the 4,000 values of the list), the list counted at each use
    shared = "a: &a [" + ",".join(["0"] * 3999) + "]\nb: *a\nc: *a\n"
    with pytest.raises(YamlFileError, match="holds 12,004 values"):
        parse_yaml(shared, "t")
    with pytest.raises(YamlFileError, match="refers to the collection that contains it"):
        parse_yaml("a: &x [1, *x]", "t")


def test_unknown_key_hints_are_capped():
    values = {f"nosuch.key{i}": 1 for i in range(5000)}
    t0 = time.perf_counter()
    with pytest.raises(c.ConfigError) as e:
        c.build(values)
    assert time.perf_counter() - t0 < 5.0
    assert len(e.value.problems) == c.MAX_UNKNOWN_SHOWN + 1
    assert e.value.problems[-1] == f"... and {5000 - c.MAX_UNKNOWN_SHOWN} more unknown keys"


# --- item 5: data checked before anything starts --------------------------------------------
def test_nan_and_inf_are_counted_with_the_first_index(tmp_path, vectors):
    x, y = vectors
    x[5, 3], x[7, 1] = np.nan, np.inf
    p = npz(tmp_path / "nan.npz", x, y)
    out = tmp_path / "out"
    one_error(bonsai("run", QUICK, "--set", "dataset.name=npz", "--set", f"dataset.path={p}",
                     "--set", "model=mlp", "--set", f"output_dir={out}"),
              "x holds 2 non-finite values", "the first at index (5, 3)")
    assert not out.exists()


def test_values_beyond_float32_are_non_finite(tmp_path):
    from fl.userdata import DataError, load_npz

    x = np.zeros((4, 3))
    x[2, 1] = 1e39  # finite in float64, inf once the model's float32
    with pytest.raises(DataError, match=r"1 non-finite value .* at index \(2, 1\)"):
        load_npz(npz(tmp_path / "big.npz", x, np.arange(4)))


def test_a_stray_label_is_reported_not_a_100001_class_model(tmp_path, vectors):
    x, y = vectors
    y = y.copy()
    y[3] = 100_000
    p = npz(tmp_path / "stray.npz", x, y)
    one_error(bonsai("validate", QUICK, "--set", "dataset.name=npz", "--set",
                     f"dataset.path={p}", "--set", "model=mlp"),
              "the largest label is 100000 (example 3)", "99990 of the classes 0..100000")


def test_label_rule():
    from fl.userdata import DataError, check_labels

    check_labels(np.array([0, 1, 2, 2]), "w")
    with pytest.raises(DataError, match="class 1 is the first"):
        check_labels(np.array([0, 2, 2]), "w")  # nothing declares 3 classes
    check_labels(np.array([0, 2, 2]), "w", num_classes=3)  # a node may lack class 1
    with pytest.raises(DataError, match="label 3 .* not below the 3 declared"):
        check_labels(np.array([0, 3]), "w", num_classes=3)
    with pytest.raises(DataError, match="holds no examples"):
        check_labels(np.array([], dtype=np.int64), "w")


def test_cnn_with_vector_data_stops_before_flower(tmp_path, vectors):
    p = npz(tmp_path / "vec.npz", *vectors)
    out = tmp_path / "out"
    one_error(bonsai("run", QUICK, "--set", "dataset.name=npz", "--set", f"dataset.path={p}",
                     "--set", f"output_dir={out}"),
              "model: 'cnn' takes images (channels, height, width)", "shape (64,)")
    assert not out.exists()  # no results folder: Flower never started


def test_grayscale_images_get_a_channel_axis(tmp_path):
    from fl.nodedata import node_data
    from fl.userdata import load_npz

    rng = np.random.default_rng(1)
    p = npz(tmp_path / "gray.npz", rng.random((30, 8, 8), dtype=np.float32), np.arange(30) % 3)
    x, _ = load_npz(p)
    assert x.shape == (30, 1, 8, 8)
    digits = c.load(None, ["model=cnn", "partition.num_clients=2"])
    assert node_data(digits, {"data-path": str(p)}).input_shape == (1, 8, 8)  # fits digits
    server = c.load(None, ["dataset.name=npz", f"dataset.path={p}", "model=cnn"])
    assert node_data(server, {"data-path": str(p)}).input_shape == (1, 8, 8)


def test_model_checked_on_the_meta_device():
    from fl.models import MAX_PARAMETERS, build_model, check_model_input

    real = sum(p.numel() for p in build_model("cnn", (1, 8, 8), 10).parameters())
    assert check_model_input("cnn", (1, 8, 8), 10) == real == 151_306
    with pytest.raises(ValueError, match="needs images of at least 2x2, got 1x1"):
        check_model_input("cnn", (1, 1, 1), 10)  # too small for the 2x2 pooling
    with pytest.raises(ValueError, match=f"allowed: at most {MAX_PARAMETERS:,}"):
        check_model_input("cnn", (3, 4096, 4096), 10)
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="parameters"):
        check_model_input("mlp", (3, 8192, 8192), 100_000)  # no memory is touched
    assert time.perf_counter() - t0 < 2.0


def test_deploy_checks_node_and_server_data(tmp_path, vectors):
    x, y = vectors
    bad = x.copy()
    bad[9, 0] = np.nan
    node = npz(tmp_path / "node.npz", bad, y)
    one_error(bonsai("deploy", "supernode", "--superlink", "127.0.0.1:9092", "--data", node,
                     "--insecure", "--dry-run"), "data-path", "1 non-finite value")
    nodes = tmp_path / "nodes"
    nodes.mkdir()
    for i in range(2):
        npz(nodes / f"n{i}.npz", x, y)
    server = npz(tmp_path / "server.npz", bad, y)
    out = tmp_path / "out"
    one_error(bonsai("deploy", "local", QUICK, "--nodes", 2, "--data", nodes, "--insecure",
                     "--set", "model=mlp", "--set", "dataset.name=npz",
                     "--set", f"dataset.path={server}", "--set", f"output_dir={out}"),
              "dataset.path", "1 non-finite value")
    assert not out.exists()


# --- item 7: paths stay where they belong ------------------------------------------------
@pytest.mark.parametrize("name", ["../../../x", "..", ".", "a/b", "a\\b", ""])
def test_name_is_one_folder_name(name):
    with pytest.raises(c.ConfigError, match="name: got .* allowed: one folder name"):
        c.load(None, [f"name={name}"])


def test_name_cannot_escape_output_dir(tmp_path):
    out = tmp_path / "a" / "b" / "out"
    one_error(bonsai("run", QUICK, "--set", "name=../../../x", "--set", f"output_dir={out}"),
              "name: got '../../../x'")
    assert list(tmp_path.iterdir()) == []


def test_a_study_named_dot_dot_is_refused(tmp_path):
    study = tmp_path / "s" / "study.yaml"
    study.parent.mkdir()
    study.write_text(f"name: '..'\noutput_dir: {tmp_path / 's' / 'studies'}\n"
                     "grid:\n  seed: [0, 1]\n")
    one_error(bonsai("validate", study), "name: got '..'")
    one_error(bonsai("sweep", study, "--dry-run"), "name: got '..'")
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["s", "study.yaml"]


def _bonsai_run_dir(d: Path, *overrides: str) -> Path:
    """A folder as `bonsai run` leaves it when stopped early: its Flower run config."""
    from fl.flowerapp import write_run_config

    d.mkdir(parents=True)
    cfg = c.load(QUICK, [*overrides, f"run_dir={d}"])
    write_run_config(cfg, d / "run_config.toml")
    return d


def test_run_dir_of_another_run_is_never_overwritten(tmp_path):
    other = _bonsai_run_dir(tmp_path / "other", "rounds=7")
    (other / "config.json").write_text(c.to_json(c.load(QUICK, ["rounds=7"])))
    (other / "rounds.jsonl").write_text('{"round": 0, "accuracy": 0.1}\n')
    before = {p.name: p.read_bytes() for p in other.iterdir()}
    one_error(bonsai("run", QUICK, "--set", f"run_dir={other}"), "holds another run",
              "rounds: 7 -> 30")
    assert {p.name: p.read_bytes() for p in other.iterdir()} == before
    same = _bonsai_run_dir(tmp_path / "same")
    one_error(bonsai("run", QUICK, "--set", f"run_dir={same}"),
              "holds an unfinished run of this config", f"--resume {same}")
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "notes.txt").write_text("mine")
    one_error(bonsai("run", QUICK, "--set", f"run_dir={junk}"), "not empty",
              "holds no Bonsai run")
    assert [p.name for p in junk.iterdir()] == ["notes.txt"]


def test_run_dir_rules_allow_new_and_empty_folders(tmp_path):
    from fl.rundir import check_run_dir

    (tmp_path / "empty").mkdir()
    for d in ("empty", "new/deeper"):
        assert check_run_dir(c.load(QUICK, [f"run_dir={tmp_path / d}"])) is None
    assert not (tmp_path / "new").exists()  # the check creates nothing


# --- item 10: one line instead of a traceback --------------------------------------------
def test_non_utf8_yaml(tmp_path):
    f = tmp_path / "latin1.yaml"
    f.write_bytes("name: caf\xe9\n".encode("latin-1"))
    one_error(bonsai("validate", f), "not UTF-8 text (byte 0xe9 at offset 9)")
    one_error(bonsai("run", f), "not UTF-8")
    with pytest.raises(YamlSyntaxError, match="line 1, column 6"):
        parse_yaml("a: [1", "t")
    with pytest.raises(YamlFileError, match="cannot be read"):
        load_yaml(tmp_path)


def test_output_dir_that_is_a_file_or_cannot_be_written(tmp_path):
    f = tmp_path / "afile"
    f.write_text("x")
    one_error(bonsai("run", QUICK, "--set", f"output_dir={f}"), "is a file, not a folder")
    one_error(bonsai("run", QUICK, "--set", f"output_dir={f}/sub"), "is a file, not a folder")
    if os.geteuid() == 0:  # root writes through permission bits: use a kernel folder
        locked = Path("/sys/bonsai-test-h19")
    else:
        (tmp_path / "ro").mkdir(mode=0o555)
        locked = tmp_path / "ro" / "out"
    one_error(bonsai("run", QUICK, "--set", f"output_dir={locked}"), "cannot be written")
    assert not locked.exists()
    study = tmp_path / "study.yaml"
    study.write_text(f"name: s\noutput_dir: {f}\ngrid:\n  seed: [0]\n")
    one_error(bonsai("sweep", study, "--dry-run"), "is a file, not a folder")


@pytest.mark.parametrize("override, expect", [
    ("dataset.synthetic_samples=1000000000000", "allowed: <= 10000000"),
    ("dataset.synthetic_devices=1000000000", "allowed: <= 100000"),
])
def test_huge_declared_sizes_are_config_errors(override, expect):
    with pytest.raises(c.ConfigError, match=expect):
        c.load(None, ["dataset.name=synthetic", "model=mlp", override])


def test_an_npz_declaring_a_huge_shape_is_one_line(tmp_path):
    """A 200-byte file whose header says (10^12, 60): numpy would try to allocate 480 TB."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False,
                                                  "shape": (10**12, 60)})
    p = tmp_path / "huge.npz"  # the header (magic string included), then 64 bytes of data
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("x.npy", header.getvalue() + b"\0" * 64)
        z.writestr("y.npy", header.getvalue())
    one_error(bonsai("validate", QUICK, "--set", "dataset.name=npz", "--set",
                     f"dataset.path={p}", "--set", "model=mlp"),
              "x declares shape (1000000000000, 60) float64 (480.0 TB)", "64 B")


@pytest.mark.parametrize("args, expect", [
    (["supernode", "--superlink", "127.0.0.1:9092", "--data", "D", "--insecure",
      "--port", "70000"], "--port: got 70000; allowed: 1..65535"),
    (["superlink", "--insecure", "--port", "0", "--dry-run"], "--port: got 0"),
    (["supernode", "--superlink", "127.0.0.1:99999", "--data", "D", "--insecure"],
     "--superlink: got '127.0.0.1:99999'"),
    (["register", "k.pub", "--superlink", "host:0", "--insecure"], "--superlink"),
    (["run", QUICK, "--superlink", "host", "--insecure"], "expected HOST:PORT"),
])
def test_ports_outside_1_to_65535(tmp_path, vectors, args, expect):
    data = npz(tmp_path / "d.npz", *vectors)
    one_error(bonsai("deploy", *[str(data) if a == "D" else a for a in args]), expect)


def test_deploy_keys_days_and_out(tmp_path):
    out = tmp_path / "keys"
    one_error(bonsai("deploy", "keys", "--out", out, "--days", "100000000"),
              "--days: got 100000000; allowed: 1..36500")
    one_error(bonsai("deploy", "keys", "--out", out, "--days", "0"), "--days: got 0")
    assert not out.exists()
    f = tmp_path / "afile"
    f.write_text("x")
    one_error(bonsai("deploy", "keys", "--out", f), "--out", "is a file, not a folder")
    one_error(bonsai("deploy", "split", QUICK, "--out", f), "is a file, not a folder")
    assert f.read_text() == "x"


@pytest.fixture
def study_dir(tmp_path):
    from test_report import write_cell

    root = tmp_path / "study"
    cells = []
    for seed in (0, 1):
        cid = f"strategy=a,seed={seed}"
        write_cell(root / cid.replace(",", "__"), "a", seed, [0.1, 0.5, 0.9])
        cells.append({"id": cid, "dir": cid.replace(",", "__"),
                      "choices": {"strategy": "a", "seed": str(seed)}})
    (root / "study.json").write_text(json.dumps({
        "name": "s", "axes": {"strategy": ["a"], "seed": ["0", "1"]}, "seed_axis": "seed",
        "cells": cells}))
    return root


@pytest.mark.parametrize("file, old, new, expect", [
    ("strategy=a__seed=0/summary.json", '"final_accuracy": 0.9', '"final_accuracy": "abc"',
     'final_accuracy is "abc", expected a number'),
    ("strategy=a__seed=1/rounds.jsonl", '"cum_bytes": 1000000', '"cum_bytes": "1 MB"',
     'line 2: cum_bytes is "1 MB", expected a number'),
    ("study.json", '"seed": ["0", "1"]', '"seed": 5', "axis 'seed' is 5"),
    ("study.json", '"choices": {"strategy": "a", "seed": "0"}', '"choices": 3',
     "needs choices as an object"),
])
def test_report_with_a_wrong_typed_value(study_dir, file, old, new, expect):
    path = study_dir / file
    assert old in path.read_text()
    path.write_text(path.read_text().replace(old, new))
    one_error(bonsai("report", study_dir, "--no-heatmaps"), expect)
    assert not (study_dir / "report").exists()


def test_report_target_that_is_not_a_number(study_dir):
    out = bonsai("report", study_dir, "--target", "abc")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "argument --target: got 'abc'; expected a number in (0, 1]" in out.stderr
    assert not (study_dir / "report").exists()


def test_resume_cannot_be_set_by_hand(tmp_path):
    one_error(bonsai("run", QUICK, "--set", "resume=true"), "resume: got True",
              "--resume RESULTS_DIR")
    one_error(bonsai("run", QUICK, "--set", "resume=true", "--set",
                     f"run_dir={tmp_path / 'r'}"), "resume: got True")
    study = tmp_path / "study.yaml"
    study.write_text("name: s\nbase: {resume: true}\ngrid:\n  seed: [0]\n")
    one_error(bonsai("validate", study), "base.resume: set by the sweep")
    assert not (tmp_path / "r").exists()


# --- item 11: minor ----------------------------------------------------------------------
def test_a_pickle_is_not_an_npz_and_no_allow_pickle_advice(tmp_path):
    from fl.userdata import DataError, load_npz

    p = tmp_path / "data.npz"
    p.write_bytes(pickle.dumps({"x": [1.0], "y": [0]}))
    with pytest.raises(DataError) as e:
        load_npz(p)
    assert "is not an .npz file of plain arrays" in str(e.value)
    assert "pickle" in str(e.value) and "allow_pickle" not in str(e.value)
    np.save(tmp_path / "one.npy", np.zeros(3))
    (tmp_path / "one.npy").rename(tmp_path / "one.npz")
    with pytest.raises(DataError, match="single .npy array"):
        load_npz(tmp_path / "one.npz")


@pytest.mark.parametrize("text", ["", "# only a comment\n", "{}\n"])
def test_an_empty_experiment_file_is_an_error(tmp_path, text):
    f = tmp_path / "empty.yaml"
    f.write_text(text)
    one_error(bonsai("validate", f), f"experiment file '{f}' is empty")


def test_resume_of_a_run_stopped_before_round_1_starts_it_again(tmp_path):
    from fl.rundir import check_resume

    d = _bonsai_run_dir(tmp_path / "early", "output_dir=" + str(tmp_path / "elsewhere"))
    cfg = c.load(QUICK)
    assert check_resume(cfg, d) is None
    assert (cfg.resume, cfg.run_dir, cfg.output_dir) == (False, str(d.resolve()),
                                                         str(tmp_path / "elsewhere"))
    other = c.load(QUICK, ["rounds=5"])
    assert "different config (rounds: 30 -> 5)" in check_resume(other, d)
    assert "has no checkpoint.pt and is not a Bonsai run folder" in check_resume(
        c.load(QUICK), tmp_path)


def test_resume_does_not_need_the_original_output_dir(tmp_path):
    from fl.checkpoint import Checkpoint, save
    from fl.rundir import check_resume

    d = tmp_path / "results" / "run"
    d.mkdir(parents=True)
    orig = c.load(QUICK, [f"output_dir={tmp_path / 'results'}", f"run_dir={d}"])
    (d / "config.json").write_text(c.to_json(orig))
    save(d, Checkpoint(round=3, arrays={}, config=c.to_json(orig)))
    cfg = c.load(QUICK)  # without --set output_dir
    assert check_resume(cfg, d) is None
    assert cfg.resume and cfg.output_dir == str(tmp_path / "results")
    assert "different config" in check_resume(c.load(QUICK, ["seed=3"]), d)


def test_a_1mb_wrong_value_gives_a_short_line(tmp_path):
    f = tmp_path / "big.yaml"
    f.write_text("rounds: " + "x" * 1_000_000 + "\n")
    line = one_error(bonsai("validate", f), "rounds: got 'xxx", "...")
    assert len(line) < 200
    assert len(c.shown(list(range(10**6)))) <= c.SHOWN_CHARS
