"""``bonsai export``: the final global model, physically shrunk by a structure.json,
saved as TorchScript / ONNX, predicting what the global model predicts."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fl.config import load, to_json
from fl.data import load_test
from fl.export import ExportError, export_run
from fl.models import build_model
from fl.pruning import groups_for, select_units, structure_to_json, structured_mask

ROOT = Path(__file__).resolve().parent.parent
SHAPE, CLASSES = (1, 8, 8), 10  # digits


def _results(tmp_path: Path, model: str, ratio: float | None, masked: bool = True) -> Path:
    """A results folder as a run leaves it: config.json, final_model.pt, structure.json.

    The structure comes from fl.pruning.select_units on made-up guidance; the
    global model has its removed units zeroed (as AutoFLIP serves it) when ``masked``.
    """
    d = tmp_path / f"{model}-{ratio}"
    d.mkdir()
    cfg = load(None, [f"model={model}", "dataset.name=digits"])
    (d / "config.json").write_text(to_json(cfg) + "\n")
    net = build_model(model, SHAPE, CLASSES, seed=3)
    state = {n: t.detach().clone() for n, t in net.state_dict().items()}
    for n, t in state.items():  # non-trivial BN statistics
        if n.endswith("running_var"):
            t.uniform_(0.5, 2.0)
        elif n.endswith("running_mean"):
            t.normal_(0.0, 0.1)
    if ratio is not None:
        groups = groups_for(model, SHAPE, CLASSES)
        gen = torch.Generator().manual_seed(7)
        guidance = {n: torch.rand(t.shape, generator=gen) for n, t in state.items()
                    if n.endswith("weight") and t.dim() > 1}
        structure = select_units(guidance, groups, ratio)
        (d / "structure.json").write_text(structure_to_json(structure) + "\n")
        if masked:
            masks = structured_mask(groups, structure, state)
            state = {n: t * masks[n].to(t.dtype) if n in masks else t for n, t in state.items()}
    torch.save(state, d / "final_model.pt")
    return d


def _kept(d: Path) -> dict[str, int]:
    return {k: len(v) for k, v in json.loads((d / "structure.json").read_text()).items()}


def _cnn_params(c1: int, c2: int, f: int) -> int:
    # conv1 1->c1 3x3, conv2 c1->c2 3x3, fc1 (c2*4*4)->f, fc2 f->10, all with biases
    return (9 * c1 + c1) + (9 * c1 * c2 + c2) + (16 * c2 * f + f) + (f * 10 + 10)


def _cnn_flops(c1: int, c2: int, f: int) -> int:
    # 2 x MACs: 3x3 convs at 8x8 (padding 1), linear layers
    return 2 * (9 * 1 * c1 * 64 + 9 * c1 * c2 * 64 + 16 * c2 * f + f * 10)


def test_cnn_torchscript_is_shrunk_and_predicts_like_the_global_model(tmp_path):
    d = _results(tmp_path, "cnn", 0.5)
    k = _kept(d)
    c1, c2, f = k["conv1"], k["conv2"], k["fc1"]
    assert (c1, c2, f) == (16, 32, 64)  # half of 32, 64, 128 units removed
    r = export_run(d, "torchscript", runs=3)
    assert r.structured and r.path == d / "model.torchscript.pt" and r.path.is_file()
    assert r.params == _cnn_params(c1, c2, f)
    assert r.full_params == _cnn_params(32, 64, 128)
    assert r.flops == _cnn_flops(c1, c2, f)
    assert r.full_flops == _cnn_flops(32, 64, 128)
    assert r.equal_predictions == r.test_examples == len(load_test(load(None, [])).test)
    assert r.max_abs_logit_diff < 1e-4
    # physically smaller: the saved module has the small shapes, no zero rows
    ts = torch.jit.load(str(r.path))
    sd = ts.state_dict()
    assert tuple(sd["conv1.weight"].shape) == (c1, 1, 3, 3)
    assert tuple(sd["fc1.weight"].shape) == (f, 16 * c2)
    assert (sd["conv1.weight"].abs().sum(dim=(1, 2, 3)) > 0).all()
    # a second export without the structure is the full model and a bigger file
    (d / "structure.json").unlink()
    full = export_run(d, "torchscript", out=tmp_path / "full.pt", runs=3)
    assert not full.structured and full.params == r.full_params
    assert full.file_bytes > 2 * r.file_bytes


def test_resnet8_masked_global_model_exports_and_an_unmasked_one_is_refused(tmp_path):
    d = _results(tmp_path, "resnet8", 0.3)
    r = export_run(d, "torchscript", runs=3)
    assert r.params < r.full_params
    assert r.equal_predictions == r.test_examples
    # a structure.json beside a model whose removed units are not zero does not
    # describe that model (AutoFLIP serves its model with those units zero)
    (tmp_path / "unmasked").mkdir()
    d = _results(tmp_path / "unmasked", "resnet8", 0.3, masked=False)
    with pytest.raises(ExportError, match=r"structure.json: group '[^']+': it removes units "
                                          r"\[.*\] \(\d+ units\) whose weights are not zero"):
        export_run(d, "torchscript", runs=3)
    assert not (d / "model.torchscript.pt").exists()


def test_onnx_round_trip(tmp_path):
    pytest.importorskip("onnx", reason="onnx is not installed (pip install 'bonsai-fl[export]')")
    d = _results(tmp_path, "cnn", 0.5)
    r = export_run(d, "onnx", runs=3)
    assert r.path.suffix == ".onnx" and r.path.is_file()
    assert r.equal_predictions == r.test_examples
    assert r.max_abs_logit_diff < 1e-4
    import onnx

    graph = onnx.load(str(r.path)).graph
    conv1 = next(i for i in graph.initializer if i.name == "conv1.weight")
    assert list(conv1.dims) == [16, 1, 3, 3]
    assert json.loads((d / "model.onnx.json").read_text())["params"] == r.params


def test_structure_that_does_not_fit_is_an_error(tmp_path):
    d = _results(tmp_path, "cnn", 0.5)
    (d / "structure.json").write_text(json.dumps({"conv1": [0, 99]}))
    with pytest.raises(ExportError, match="structure.json"):
        export_run(d, "torchscript", runs=1)


def _cli_export(d: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fl.cli", "export", str(d), "--runs", "3"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def _one_line(proc: subprocess.CompletedProcess, *words: str) -> str:
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for w in words:
        assert w in lines[0], lines[0]
    return lines[0]


def test_tampered_structure_is_caught_by_the_weights(tmp_path):
    """Today's main shrank the reference model with the same file: {"conv1": [0]}
    exported a broken model and reported every prediction equal (exit 0)."""
    d = _results(tmp_path, "cnn", 0.5)
    real = json.loads((d / "structure.json").read_text())
    (d / "structure.json").write_text(json.dumps({**real, "conv1": [0]}))
    live = [u for u in real["conv1"] if u != 0]  # kept by the run, removed by the file
    line = _one_line(_cli_export(d), "structure.json: group 'conv1': it removes units "
                     f"{str(live[:8])[:-1]}, ...] ({len(live)} units) whose weights are not "
                     "zero in final_model.pt")
    assert line.startswith("bonsai: error: ")
    assert not (d / "model.torchscript.pt").exists()
    # keeping units the run removed (all zero) is a wrong structure too
    removed = sorted(set(range(64)) - set(real["conv2"]))
    (d / "structure.json").write_text(json.dumps({**real, "conv2": sorted(real["conv2"]
                                                                          + removed[:3])}))
    _one_line(_cli_export(d), f"group 'conv2': it keeps units {removed[:3]} (3 units) whose "
              "weights are all zero in final_model.pt")
    (d / "structure.json").write_text(json.dumps(real))
    assert _cli_export(d).returncode == 0


def test_structure_is_cross_checked_with_the_checkpoint(tmp_path):
    """Given the run's checkpoint.pt, structure.json must equal the structure the
    server held, even where the weights alone cannot tell."""
    from fl.checkpoint import Checkpoint, save

    d = _results(tmp_path, "cnn", 0.5)
    real = {k: torch.tensor(v) for k, v in json.loads((d / "structure.json").read_text()).items()}
    state = torch.load(d / "final_model.pt", weights_only=True)
    held = {**real, "fc1": real["fc1"][1:]}  # the server had also removed one more fc1 unit
    save(d, Checkpoint(3, state, {"structure": held}))
    with pytest.raises(ExportError, match=r"group 'fc1' keeps 64 units, the run's checkpoint.pt "
                                          r"63; units kept only in structure.json: \[" +
                       str(int(real["fc1"][0])) + r"\] \(1 units\)"):
        export_run(d, "torchscript", runs=1)
    save(d, Checkpoint(3, state, {"structure": real}))
    assert export_run(d, "torchscript", runs=1).equal_predictions > 0
    (d / "checkpoint.pt").write_bytes(b"damaged")
    with pytest.raises(ExportError, match="RESULTS_DIR: .* is not a valid, safe Bonsai checkpoint"):
        export_run(d, "torchscript", runs=1)


def test_cli_prints_sizes_and_bad_input_is_one_line(tmp_path):
    d = _results(tmp_path, "mlp", 0.25)
    out = subprocess.run([sys.executable, "-m", "fl.cli", "export", str(d), "--runs", "3"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for word in ("parameters", "file size", "FLOPs/example", "CPU latency", "predictions"):
        assert word in out.stdout
    bad = subprocess.run([sys.executable, "-m", "fl.cli", "export", str(tmp_path / "nope")],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 2
    assert bad.stderr.strip().count("\n") == 0
    assert bad.stderr.startswith("bonsai: error: RESULTS_DIR:")


@pytest.mark.slow
def test_real_autoflip_run_exports_and_a_tampered_structure_is_refused(tmp_path):
    """A real 2-round AutoFLIP simulation (final pruning targets at round 2): its
    final_model.pt is zero exactly at the removed units, export passes against the full
    model as saved, and structure.json {"conv1": [0]} is one line, exit 2."""
    import uuid

    from processes import bonsai, wait_gone

    from fl.checkpoint import load as load_checkpoint
    from fl.pruning import zero_units

    mark = uuid.uuid4().hex
    proc = bonsai(["run", "simulations/quickstart.yaml", "--quiet", "--set", "rounds=2",
                   "--set", "partition.num_clients=3", "--set", "strategy.min_train_clients=3",
                   "--set", "pruning.mask_every=1", "--set", "pruning.schedule_rounds=1",
                   "--set", f"output_dir={tmp_path}", "--set", "name=x"], mark)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-3000:]
    assert not (left := wait_gone(mark)), left
    (d,) = [p for p in tmp_path.iterdir() if p.name.startswith("x")]
    real = json.loads((d / "structure.json").read_text())
    assert len(real["conv1"]) == 16 and len(real["fc1"]) == 64  # half the units removed
    held = load_checkpoint(d).strategy["structure"]
    assert {g: v.tolist() for g, v in held.items()} == real
    state = torch.load(d / "final_model.pt", weights_only=True)
    zero = zero_units(groups_for("cnn", SHAPE, CLASSES), state)
    assert {g: torch.nonzero(~z).reshape(-1).tolist() for g, z in zero.items()} == real

    ok = _cli_export(d)
    assert ok.returncode == 0, ok.stderr
    n = len(load_test(load(None, [])).test)
    assert f"predictions    {n}/{n} test examples equal" in ok.stdout
    (d / "structure.json").write_text(json.dumps({"conv1": [0]}))
    _one_line(_cli_export(d), "structure.json: group 'conv1' keeps 1 units, the run's "
              "checkpoint.pt 16")
    (d / "checkpoint.pt").unlink()  # without the checkpoint the weights still tell
    live = len([u for u in real["conv1"] if u != 0])
    _one_line(_cli_export(d), "structure.json: group 'conv1': it removes units",
              f"({live} units) whose weights are not zero in final_model.pt")
