"""FLOPs per example from real layer shapes (ALGORITHMS.md 1.4), against hand counts."""

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
