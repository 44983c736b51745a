"""Coupled unit groups (docs/ALGORITHMS.md §1.2): who is removed together, and what is
never removed."""

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
    ("name", "shape"),
    [("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)), ("resnet8", IMG), ("cnn_fedavg", (1, 8, 8)),
     ("cnn_leaf", (1, 8, 8)), ("lenet", (3, 16, 16)), ("resnet18_gn", IMG), ("char_lstm", (6,))],
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


def test_lenet_groups_follow_the_two_valid_convs_and_three_linears():
    groups = _by_name(groups_for("lenet", (3, 32, 32), 10))
    assert [(n, g.n_units) for n, g in sorted(groups.items())] == [
        ("conv1", 6), ("conv2", 16), ("fc1", 120), ("fc2", 84)]
    # after the second pool each of conv2's 16 channels is a 5x5 map: 25 columns of fc1
    assert Member("fc1.weight", 1, 25) in groups["conv2"].members


def test_resnet18_gn_units_are_whole_groupnorm_groups():
    """A unit is one GroupNorm group (C/2 channels): removing it leaves the statistics of
    the other group as they were, and every GroupNorm keeps whole groups."""
    groups = _by_name(groups_for("resnet18_gn", IMG, 10))
    assert len(groups) == 12  # 4 residual streams + 8 inner block convs
    widths = {"layer1": 64, "layer2": 128, "layer3": 256, "layer4": 512}
    for name, g in groups.items():
        c = 64 if name == "conv1" else widths[name.split(".")[0]]
        assert (g.n_units, g.block) == (2, c // 2), name
        assert all(m.width == c // 2 for m in g.members if m.param != "fc.weight"), name
    stem = groups["conv1"]
    assert stem.producers == ("conv1.weight", "layer1.0.conv2.weight", "layer1.1.conv2.weight")
    assert {("gn1.weight", 0), ("layer1.0.gn2.bias", 0), ("layer1.1.gn2.weight", 0),
            ("layer2.0.shortcut.0.weight", 1), ("layer2.0.conv1.weight", 1)} <= {
        (m.param, m.dim) for m in stem.members}
    # the last stream feeds the classifier through the average pool: 256 columns per unit
    assert Member("fc.weight", 1, 256) in groups["layer4.0.conv2"].members
    assert Member("conv1.weight", 0, 32).positions(torch.tensor([1])).tolist() == list(
        range(32, 64))


def test_char_lstm_units_are_hidden_units_across_the_four_gates():
    groups = _by_name(groups_for("char_lstm", (6,), 10))
    assert sorted(groups) == ["lstm1", "lstm2"]  # the embedding and the classifier: none
    g1 = groups["lstm1"]
    assert (g1.n_units, g1.block) == (256, 1)
    assert g1.producers == ("lstm1.weight_hh_l0", "lstm1.weight_ih_l0")
    assert set(g1.members) == {
        Member("lstm1.weight_ih_l0", 0, 1, 4, 256),
        Member("lstm1.weight_hh_l0", 0, 1, 4, 256),
        Member("lstm1.bias_ih_l0", 0, 1, 4, 256),
        Member("lstm1.bias_hh_l0", 0, 1, 4, 256),
        Member("lstm1.weight_hh_l0", 1),  # the recurrence reads the unit too
        Member("lstm2.weight_ih_l0", 1),  # and the next layer's input
    }
    assert Member("fc.weight", 1) in groups["lstm2"].members
    # unit 3 is row 3 of the input, forget, cell and output gate blocks
    assert Member("x", 0, 1, 4, 256).positions(torch.tensor([3])).tolist() == [
        3, 259, 515, 771]
    assert Member("x", 0, 1, 4, 256).size(256) == 1024


def test_char_lstm_prunable_tensors_are_the_lstm_and_linear_weights():
    model = build_model("char_lstm", (6,), 10, seed=0)
    assert prunable_names(model) == [
        "lstm1.weight_ih_l0", "lstm1.weight_hh_l0", "lstm2.weight_ih_l0", "lstm2.weight_hh_l0",
        "fc.weight"]  # not the embedding, no biases


def test_a_multi_layer_lstm_is_refused_with_a_clear_error():
    from torch import nn

    from fl.pruning import build_groups

    class Stacked(nn.Module):
        def __init__(self):
            super().__init__()
            self.lstm = nn.LSTM(4, 8, num_layers=2, batch_first=True)
            self.fc = nn.Linear(8, 3)

        def forward(self, x):
            return self.fc(self.lstm(x)[0][:, -1])

    with pytest.raises(ValueError, match="LSTM 'lstm' must be single-layer"):
        build_groups(Stacked(), (5, 4))
