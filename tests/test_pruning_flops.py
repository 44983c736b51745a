"""FLOPs per example from real layer shapes (docs/ALGORITHMS.md §1.4), against hand counts."""

from __future__ import annotations

import pytest
import torch

from fl.models import build_model
from fl.pruning import count_flops, shrink_model, sparse_flops, training_flops_per_example

# cnn on 1x8x8: conv1 3x3 1->32 on 8x8, conv2 3x3 32->64 on 8x8, pool -> fc1 1024->128, fc2 128->10
CNN_MACS = 9 * 1 * 32 * 64 + 9 * 32 * 64 * 64 + 1024 * 128 + 128 * 10  # 1_330_432
MLP_MACS = 64 * 128 + 128 * 64 + 64 * 10  # 17_024


def test_dense_flops_by_hand():
    assert CNN_MACS == 1_330_432 and MLP_MACS == 17_024
    assert count_flops(build_model("cnn", (1, 8, 8), 10), (1, 8, 8)) == 2 * CNN_MACS
    assert count_flops(build_model("mlp", (1, 8, 8), 10), (1, 8, 8)) == 2 * MLP_MACS


def test_strided_convs_use_real_output_sizes():
    # resnet8 on 3x8x8: layer2/layer3 run at 4x4 and 2x2 (stride 2)
    w = 16
    macs = (
        9 * 3 * w * 64  # stem
        + 2 * 9 * w * w * 64  # layer1
        + 9 * w * 2 * w * 16
        + 9 * 2 * w * 2 * w * 16
        + w * 2 * w * 16  # layer2 + shortcut
        + 9 * 2 * w * 4 * w * 4
        + 9 * 4 * w * 4 * w * 4
        + 2 * w * 4 * w * 4  # layer3 + shortcut
        + 4 * w * 10  # fc
    )
    assert count_flops(build_model("resnet8", (3, 8, 8), 10), (3, 8, 8)) == 2 * macs


def test_shrunk_cnn_flops_by_hand():
    structure = {
        "conv1": torch.arange(20),
        "conv2": torch.arange(10, 50),
        "fc1": torch.arange(100),
    }
    small = shrink_model("cnn", (1, 8, 8), 10, structure)
    macs = 9 * 1 * 20 * 64 + 9 * 20 * 40 * 64 + 40 * 16 * 100 + 100 * 10  # 537_320
    assert count_flops(small, (1, 8, 8)) == 2 * macs == 1_074_640


def test_sparse_flops_count_kept_weights_only():
    model = build_model("cnn", (1, 8, 8), 10)
    masks = {
        "conv2.weight": torch.zeros(64, 32, 3, 3, dtype=torch.bool),
        "fc1.weight": torch.zeros(128, 1024, dtype=torch.bool),
    }
    masks["conv2.weight"].view(-1)[:1000] = True  # each conv weight is used 8*8 times
    masks["fc1.weight"].view(-1)[:5000] = True
    macs = 9 * 32 * 64 + 1000 * 64 + 5000 + 128 * 10
    assert sparse_flops(model, masks, (1, 8, 8)) == 2 * macs
    with torch.no_grad():
        model.fc2.weight[:, :64] = 0.0  # masks=None reads the zeros of the weights
    assert sparse_flops(model, None, (1, 8, 8)) == 2 * (CNN_MACS - 64 * 10)
    with pytest.raises(ValueError, match="masks"):
        sparse_flops(model, {"fc1.weight": torch.ones(3, 3, dtype=torch.bool)}, (1, 8, 8))
    with pytest.raises(ValueError, match="masks"):
        sparse_flops(model, {"nope.weight": torch.ones(3, dtype=torch.bool)}, (1, 8, 8))


def test_training_is_three_forwards():
    assert training_flops_per_example(2 * MLP_MACS) == 6 * MLP_MACS


# --- the literature models ----------------------------------------------------------------
def test_lenet_and_cnn_fedavg_flops_by_hand():
    # lenet on 3x32x32: conv1 5x5 3->6 on 28x28, conv2 5x5 6->16 on 10x10, fc 400-120-84-10
    lenet = 25 * 3 * 6 * 28 * 28 + 25 * 6 * 16 * 10 * 10 + 400 * 120 + 120 * 84 + 84 * 10
    assert lenet == 651_720
    assert count_flops(build_model("lenet", (3, 32, 32), 10), (3, 32, 32)) == 2 * lenet
    # cnn_fedavg on 1x28x28 ('same'): conv1 on 28x28, conv2 on 14x14, fc 3136-512-10
    fedavg = 25 * 1 * 32 * 784 + 25 * 32 * 64 * 196 + 3136 * 512 + 512 * 10
    assert fedavg == 12_273_152
    assert count_flops(build_model("cnn_fedavg", (1, 28, 28), 10), (1, 28, 28)) == 2 * fedavg


def test_resnet18_gn_flops_by_hand_groupnorm_not_counted():
    # on 3x8x8: stages at 8x8, 4x4, 2x2, 1x1 (64 / 16 / 4 / 1 positions)
    def stage(c_in, c, pos):
        first = 9 * c_in * c * pos + 9 * c * c * pos + (c_in * c * pos if c_in != c else 0)
        return first + 2 * 9 * c * c * pos

    macs = (9 * 3 * 64 * 64 + stage(64, 64, 64) + stage(64, 128, 16) + stage(128, 256, 4)
            + stage(256, 512, 1) + 512 * 10)
    assert count_flops(build_model("resnet18_gn", (3, 8, 8), 10), (3, 8, 8)) == 2 * macs


def test_lstm_flops_are_four_gates_times_input_plus_hidden_times_hidden_per_step():
    from fl.models import CharLSTM

    # 5 steps, vocabulary 7, embedding 3, hidden 4: 4*4*(3+4) + 4*4*(4+4) MACs per step,
    # the classifier once (last step); the embedding lookup costs no multiplications
    small = CharLSTM(5, 7, embed=3, hidden=4)
    assert count_flops(small, (5,)) == 2 * (5 * 4 * 4 * (3 + 4) + 5 * 4 * 4 * (4 + 4) + 4 * 7)
    assert 2 * (5 * 112 + 5 * 128 + 28) == 2_456
    # the LEAF model on 80 characters: 63,590,400 MACs per example
    leaf = 80 * 4 * 256 * (8 + 256) + 80 * 4 * 256 * (256 + 256) + 256 * 80
    assert leaf == 63_590_400
    assert count_flops(build_model("char_lstm", (80,), 80), (80,)) == 2 * leaf
    # shrunk to 100 and 200 hidden units (6 steps, vocabulary 10)
    structure = {"lstm1": torch.arange(100), "lstm2": torch.arange(56, 256)}
    shrunk = shrink_model("char_lstm", (6,), 10, structure)
    macs = 6 * 4 * 100 * (8 + 100) + 6 * 4 * 200 * (100 + 200) + 200 * 10
    assert count_flops(shrunk, (6,)) == 2 * macs


def test_sparse_lstm_flops_count_each_kept_weight_once_per_step():
    from fl.models import CharLSTM

    model = CharLSTM(5, 7, embed=3, hidden=4)
    masks = {"lstm1.weight_ih_l0": torch.zeros(16, 3, dtype=torch.bool),
             "lstm2.weight_hh_l0": torch.zeros(16, 4, dtype=torch.bool)}
    masks["lstm1.weight_ih_l0"].view(-1)[:10] = True
    masks["lstm2.weight_hh_l0"].view(-1)[:7] = True
    dense = 5 * 4 * 4 * (3 + 4) + 5 * 4 * 4 * (4 + 4) + 4 * 7
    kept = dense - 5 * (48 - 10) - 5 * (64 - 7)
    assert sparse_flops(model, masks, (5,)) == 2 * kept
    with torch.no_grad():
        model.lstm1.weight_hh_l0[:8] = 0.0  # masks=None reads the zeros of the weights
    assert sparse_flops(model, None, (5,)) == 2 * (dense - 5 * 8 * 4)
