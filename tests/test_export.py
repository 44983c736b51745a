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


def test_resnet8_unmasked_global_model_gets_the_mask(tmp_path):
    d = _results(tmp_path, "resnet8", 0.3, masked=False)
    r = export_run(d, "torchscript", runs=3)
    assert r.params < r.full_params
    assert r.equal_predictions == r.test_examples


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
