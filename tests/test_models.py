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


# --- models from the literature ---------------------------------------------------------
# (name, input shape, classes): two configurations each
LITERATURE = [
    ("cnn_fedavg", (1, 28, 28), 10), ("cnn_fedavg", (3, 8, 8), 100),
    ("cnn_leaf", (1, 28, 28), 62), ("cnn_leaf", (1, 8, 8), 10),
    ("lenet", (3, 32, 32), 10), ("lenet", (1, 16, 17), 62),
    ("resnet18_gn", (3, 32, 32), 10), ("resnet18_gn", (1, 8, 8), 100),
    ("char_lstm", (80,), 80), ("char_lstm", (7,), 30),
]


def _inputs(name, shape, classes, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    if name == "char_lstm":
        return torch.randint(0, classes, (n, *shape), generator=g)
    return torch.randn(n, *shape, generator=g)


@pytest.mark.parametrize("name, shape, classes", LITERATURE)
def test_literature_models_shapes_forward_and_backward(name, shape, classes):
    model = build_model(name, shape, classes, seed=0)
    x = _inputs(name, shape, classes, 3)
    logits = model(x)
    assert logits.shape == (3, classes)
    torch.nn.functional.cross_entropy(logits, torch.arange(3) % classes).backward()
    for n, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert any(float(p.grad.abs().sum()) > 0 for p in model.parameters())


def test_literature_parameter_counts_match_the_papers():
    def count(name, shape, classes):
        return sum(p.numel() for p in build_model(name, shape, classes).parameters())

    # McMahan et al. 2017, Sec. 3: "1,663,370 total parameters" on MNIST ('same' padding)
    assert count("cnn_fedavg", (1, 28, 28), 10) == 1_663_370
    # LEAF FEMNIST CNN, 62 classes: conv 5x5 1->32, 32->64, fc 7*7*64->2048, 2048->62
    assert count("cnn_leaf", (1, 28, 28), 62) == (
        25 * 32 + 32 + 25 * 32 * 64 + 64 + 3136 * 2048 + 2048 + 2048 * 62 + 62) == 6_603_710
    # NIID-Bench SimpleCNN on CIFAR-10: conv 3->6, 6->16 (5x5 valid), fc 400-120-84-10
    assert count("lenet", (3, 32, 32), 10) == (
        75 * 6 + 6 + 150 * 16 + 16 + 400 * 120 + 120 + 120 * 84 + 84 + 84 * 10 + 10) == 62_006
    # ResNet-18, CIFAR stem; GroupNorm has the same weight + bias per channel as BatchNorm
    assert count("resnet18_gn", (3, 32, 32), 10) == 11_173_962
    # char_lstm: embedding 80x8, LSTM 8->256 and 256->256 (4 gates, two biases), fc 256->80
    assert count("char_lstm", (80,), 80) == (
        80 * 8 + 4 * 256 * (8 + 256) + 8 * 256 + 4 * 256 * (256 + 256) + 8 * 256
        + 256 * 80 + 80) == 819_920


def test_resnet18_gn_has_groupnorm_with_two_groups_and_a_cifar_stem():
    m = build_model("resnet18_gn", (3, 32, 32), 10)
    norms = [mod for mod in m.modules() if isinstance(mod, torch.nn.GroupNorm)]
    assert len(norms) == 20 and all(gn.num_groups == 2 for gn in norms)
    assert not any(isinstance(mod, torch.nn.BatchNorm2d) for mod in m.modules())
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert not any(isinstance(mod, torch.nn.MaxPool2d) for mod in m.modules())


def test_char_lstm_reads_the_last_step_of_two_lstm_layers():
    m = build_model("char_lstm", (80,), 80)
    assert (m.embedding.num_embeddings, m.embedding.embedding_dim) == (80, 8)
    assert (m.lstm1.input_size, m.lstm1.hidden_size, m.lstm2.hidden_size) == (8, 256, 256)
    x = _inputs("char_lstm", (80,), 80, 2)
    y = x.clone()
    y[:, :-1] = (y[:, :-1] + 1) % 80  # a different history changes the prediction
    assert not torch.allclose(m(x), m(y))


def test_model_input_rules_are_declared_once_and_agree():
    from fl import config
    from fl.models import TokenModel

    assert set(config.FIELDS["model"].metadata["choices"]) == set(available_models())
    for name in available_models():
        shape = (12,) if config.requires_tokens(name) else (3, 16, 16)
        model = build_model(name, shape, 5)
        assert isinstance(model, TokenModel) == config.requires_tokens(name), name
        assert config.requires_image(name) == (name not in ("mlp", "char_lstm")), name


@pytest.mark.parametrize("name, shape, message", [
    ("lenet", (1, 8, 8), "model: 'lenet' needs images of at least 16x16, got 8x8"),
    ("lenet", (3, 32, 15), "model: 'lenet' needs images of at least 16x16, got 32x15"),
    ("cnn_fedavg", (1, 3, 8), "model: 'cnn_fedavg' needs images of at least 4x4, got 3x8"),
    ("cnn_leaf", (784,), "model: 'cnn_leaf' needs image inputs (channels, height, width)"),
    ("char_lstm", (1, 8, 8), "model: 'char_lstm' needs token-id sequences"),
])
def test_inputs_a_model_cannot_take_are_clear_errors(name, shape, message):
    with pytest.raises(ValueError) as e:
        build_model(name, shape, 10)
    assert str(e.value).startswith(message)


def test_smallest_inputs_the_models_accept_run():
    assert build_model("lenet", (1, 16, 16), 10)(torch.randn(2, 1, 16, 16)).shape == (2, 10)
    assert build_model("cnn_leaf", (1, 4, 4), 10)(torch.randn(2, 1, 4, 4)).shape == (2, 10)
    assert build_model("resnet18_gn", (3, 1, 1), 10)(torch.randn(2, 3, 1, 1)).shape == (2, 10)
