"""Model registry: shapes, parameter counts, reproducible initialisation."""

import pytest
import torch

from fl.models import available_models, build_model


@pytest.mark.parametrize("name, shape", [("mlp", (64,)), ("mlp", (1, 8, 8)), ("cnn", (1, 8, 8)),
                                         ("cnn", (3, 32, 32)), ("resnet8", (3, 32, 32)),
                                         ("resnet8", (1, 8, 8))])
def test_output_shape(name, shape):
    model = build_model(name, shape, 10)
    assert model(torch.randn(5, *shape)).shape == (5, 10)


def test_parameter_counts_by_hand():
    # mlp 64-128-64-10
    assert sum(p.numel() for p in build_model("mlp", (64,), 10).parameters()) == (
        64 * 128 + 128 + 128 * 64 + 64 + 64 * 10 + 10)
    # cnn on 1x8x8: conv 1->32, conv 32->64 (3x3), pool to 4x4, fc 1024->128, fc 128->10
    assert sum(p.numel() for p in build_model("cnn", (1, 8, 8), 10).parameters()) == (
        32 * 9 + 32 + 64 * 32 * 9 + 64 + 1024 * 128 + 128 + 128 * 10 + 10)


def test_seeded_init_is_reproducible():
    a = build_model("resnet8", (1, 8, 8), 10, seed=3).state_dict()
    b = build_model("resnet8", (1, 8, 8), 10, seed=3).state_dict()
    c = build_model("resnet8", (1, 8, 8), 10, seed=4).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["conv1.weight"], c["conv1.weight"])


def test_resnet8_has_residual_batchnorm():
    m = build_model("resnet8", (1, 8, 8), 10)
    names = [n for n, _ in m.named_modules()]
    assert "layer2.shortcut.1" in names and "layer1.bn2" in names


def test_bad_input():
    assert set(available_models()) >= {"mlp", "cnn", "resnet8"}
    with pytest.raises(ValueError, match="unknown value 'vgg'"):
        build_model("vgg", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="needs image inputs"):
        build_model("cnn", (60,), 10)
