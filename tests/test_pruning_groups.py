"""Coupled unit groups (ALGORITHMS.md 1.2): who is removed together, and what is never removed."""

from __future__ import annotations

import pytest
import torch

from fl.models import build_model
from fl.pruning import Member, classifier_name, groups_for, prunable_names

IMG = (3, 8, 8)


def _by_name(groups):
    return {g.name: g for g in groups}


def test_mlp_groups_are_hidden_neurons_with_next_layer_inputs():
    groups = _by_name(groups_for("mlp", (1, 8, 8), 10))
    assert sorted(groups) == ["fc1", "fc2"]  # fc3 is the classifier: no group
    assert groups["fc1"].n_units == 128
    assert set(groups["fc1"].members) == {
        Member("fc1.weight", 0),
        Member("fc1.bias", 0),
        Member("fc2.weight", 1),
    }
    assert set(groups["fc2"].members) == {
        Member("fc2.weight", 0),
        Member("fc2.bias", 0),
        Member("fc3.weight", 1),
    }


def test_cnn_flatten_couples_a_channel_to_h_times_w_columns():
    groups = _by_name(groups_for("cnn", (1, 8, 8), 10))
    assert sorted(groups) == ["conv1", "conv2", "fc1"]
    # after the 2x2 pool each of conv2's 64 channels is a 4x4 map -> 16 columns of fc1
    assert Member("fc1.weight", 1, 16) in groups["conv2"].members
    assert Member("fc1.weight", 1, 16).positions(torch.tensor([0, 2])).tolist() == [
        *range(0, 16),
        *range(32, 48),
    ]


def test_resnet8_residual_stream_is_one_group():
    groups = _by_name(groups_for("resnet8", IMG, 10))
    assert sorted(groups) == [
        "conv1",
        "layer1.conv1",
        "layer2.conv1",
        "layer2.conv2",
        "layer3.conv1",
        "layer3.conv2",
    ]
    stem = groups["conv1"]
    # the stem conv and layer1's second conv both write the identity-shortcut stream
    assert stem.producers == ("conv1.weight", "layer1.conv2.weight")
    params = {(m.param, m.dim) for m in stem.members}
    assert {
        ("conv1.weight", 0),
        ("bn1.weight", 0),
        ("bn1.bias", 0),
        ("bn1.running_mean", 0),
        ("bn1.running_var", 0),
        ("layer1.conv2.weight", 0),
        ("layer1.bn2.weight", 0),
        ("layer1.bn2.bias", 0),
        # readers of the stream: the next block's inputs, through both paths
        ("layer1.conv1.weight", 1),
        ("layer2.conv1.weight", 1),
        ("layer2.shortcut.0.weight", 1),
    } <= params
    # a projection shortcut ties its conv + BN to the block's second conv + BN
    s3 = groups["layer3.conv2"]
    assert s3.producers == ("layer3.conv2.weight", "layer3.shortcut.0.weight")
    assert {("layer3.shortcut.1.weight", 0), ("layer3.bn2.bias", 0), ("fc.weight", 1)} <= {
        (m.param, m.dim) for m in s3.members
    }
    assert [groups[n].n_units for n in sorted(groups)] == [16, 16, 32, 32, 64, 64]


@pytest.mark.parametrize(
    ("name", "shape"), [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet8", IMG)]
)
def test_classifier_outputs_are_in_no_group(name, shape):
    model = build_model(name, shape, 10, seed=0)
    head = classifier_name(model)
    for g in groups_for(name, shape, 10):
        for m in g.members:
            assert not (m.param.startswith(head + ".") and m.dim == 0)
    assert f"{head}.weight" in prunable_names(model)  # still prunable entry-wise


def test_prunable_names_are_conv_and_linear_weights():
    model = build_model("resnet8", IMG, 10, seed=0)
    names = prunable_names(model)
    assert len(names) == 10  # stem + 3 blocks x 2 convs + 2 shortcuts + fc
    assert all(n.endswith(".weight") and "bn" not in n and "shortcut.1" not in n for n in names)
