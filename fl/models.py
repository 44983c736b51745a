"""Model registry: small networks and the models of published non-IID benchmarks.

Every model is built by name from ``(input_shape, num_classes)`` so that the
server, the clients and the pruning code construct identical architectures.
Layer attribute names are stable (``conv1``, ``fc1``, ...) because the pruning
code and the wire format address tensors by their state-dict names.

Which model takes which inputs (images, token ids, a least image size) is
declared once, in :mod:`fl.config` (``input_problem``); the constructors here
ask it. Models from the literature: ``cnn_fedavg`` (McMahan et al. 2017),
``cnn_leaf`` (Caldas et al. 2018), ``lenet`` (Li et al., ICDE 2022),
``resnet18_gn`` (Reddi et al., ICLR 2021), ``char_lstm`` (Caldas et al. 2018;
Li et al., MLSys 2020); each class's docstring gives its layer list and source.

Why one module of this length: the registry and every architecture it builds, so
one file says which models exist and what each is.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import torch
from torch import nn

from fl import config

ModelFactory = Callable[[tuple[int, ...], int], nn.Module]
_REGISTRY: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register ``factory(input_shape, num_classes) -> nn.Module`` under ``name``."""

    def deco(factory: ModelFactory) -> ModelFactory:
        if name in _REGISTRY:
            raise ValueError(f"model {name!r} is already registered")
        _REGISTRY[name] = factory
        return factory

    return deco


def available_models() -> list[str]:
    """Names accepted by :func:`build_model`."""
    return sorted(_REGISTRY)


def build_model(
    name: str, input_shape: tuple[int, ...], num_classes: int, seed: int | None = None
) -> nn.Module:
    """Build model ``name``; with ``seed`` the initial weights are reproducible.

    Every method in a comparison starts from the same theta_0 by building the
    model with the same seed (docs/ALGORITHMS.md §1.1).
    """
    if name not in _REGISTRY:
        raise ValueError(f"model: unknown value {name!r}; allowed: {', '.join(available_models())}")
    if seed is None:
        return _REGISTRY[name](tuple(input_shape), num_classes)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _REGISTRY[name](tuple(input_shape), num_classes)


requires_image = config.requires_image  # the name rule lives with the config (no torch there)

#: the largest model a run may build (4 GB of float32 weights, before optimizer state)
MAX_PARAMETERS = 1_000_000_000


def check_model_input(name: str, input_shape: tuple[int, ...], num_classes: int) -> int:
    """Check that model ``name`` can be built for ``input_shape`` and ``num_classes`` and
    take one such example; return its parameter count.

    The model is built on PyTorch's meta device (shapes only, no memory, about a
    millisecond), so an image model fed vectors, images too small for its pooling,
    or inputs that would make a model of billions of weights are caught before any
    process starts. Raises ValueError with one line.
    """
    if name not in _REGISTRY:
        raise ValueError(f"model: unknown value {name!r}; allowed: {', '.join(available_models())}")
    shape = tuple(int(s) for s in input_shape)
    try:
        with warnings.catch_warnings(), torch.device("meta"):
            warnings.simplefilter("ignore")  # zero-size layers warn; the forward pass decides
            model = _REGISTRY[name](shape, int(num_classes))
            params = sum(p.numel() for p in model.parameters())
            if params > MAX_PARAMETERS:
                raise ValueError(
                    f"model: {name!r} on inputs of shape {shape} with {num_classes} classes has "
                    f"{params:,} parameters; allowed: at most {MAX_PARAMETERS:,} (smaller "
                    "inputs or fewer classes)")
            model.eval()
            model(example_input(model, shape))
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"model: {name!r} cannot take inputs of shape {shape} ({first})") from None
    return params


class TokenModel(nn.Module):
    """Base of the models whose input is int64 token ids ``(N, sequence length)``.

    :func:`example_input` reads it; the config's ``TEXT_MODELS`` names the same
    models for code without torch (a test keeps the two in step).
    """


def example_input(
    model: nn.Module, input_shape: tuple[int, ...], batch: int = 1,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Zeros of ``(batch, *input_shape)`` that ``model`` accepts: int64 token ids
    (id 0) for a :class:`TokenModel`, float32 otherwise. For tracing and counting."""
    dtype = torch.int64 if isinstance(model, TokenModel) else torch.float32
    return torch.zeros(batch, *tuple(input_shape), dtype=dtype, device=device)


class MLP(nn.Module):
    """Two hidden ReLU layers on flattened inputs."""

    def __init__(self, in_features: int, num_classes: int, hidden: tuple[int, int] = (128, 64)):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(x, 1)
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


class CNN(nn.Module):
    """Two 3x3 convolutions, one 2x2 max-pool, two linear layers."""

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 32):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(2 * width * (h // 2) * (w // 2), 128)
        self.fc2 = nn.Linear(128, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class BasicBlock(nn.Module):
    """ResNet basic block; a 1x1 projection shortcut when the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet8(nn.Module):
    """ResNet-8: a stem, three basic blocks (16, 32, 64 channels), a linear head.

    The residual additions couple output channels across layers, which the
    structured pruning must respect (docs/ALGORITHMS.md §1.2).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, width: int = 16):
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, width, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


class TwoConvCNN(nn.Module):
    """Two 5x5 'same' convolutions (32, 64 channels), each followed by ReLU and a 2x2
    max-pool, a hidden ReLU layer of ``hidden`` units, then the classifier.

    With ``hidden=512`` it is the CNN of McMahan et al. 2017 ("Communication-Efficient
    Learning of Deep Networks from Decentralized Data", Sec. 3: 1,663,370 parameters on
    28x28 MNIST, which fixes 'same' padding); with ``hidden=2048`` the FEMNIST CNN of
    LEAF (Caldas et al. 2018, models/femnist/cnn.py). Inputs of at least 4x4.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int, hidden: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 32, 5, padding=2)
        self.conv2 = nn.Conv2d(32, 64, 5, padding=2)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(64 * (h // 4) * (w // 4), hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        return self.fc2(x)


class LeNet(nn.Module):
    """The simple CNN of NIID-Bench (Li et al., "Federated Learning on Non-IID Data
    Silos: An Experimental Study", ICDE 2022; SimpleCNN in its code): conv 5x5 with 6
    channels, ReLU, 2x2 max-pool, conv 5x5 with 16 channels, ReLU, 2x2 max-pool, fc 120,
    ReLU, fc 84, ReLU, classifier. 'Valid' convolutions: 32x32 -> 5x5 maps before fc1,
    inputs of at least 16x16 (fl.config.MIN_IMAGE_SIZE).
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int):
        super().__init__()
        c, h, w = input_shape
        self.conv1 = nn.Conv2d(c, 6, 5)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.pool = nn.MaxPool2d(2)
        self.fc1 = nn.Linear(16 * self.side(h) * self.side(w), 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    @staticmethod
    def side(n: int) -> int:
        """Height/width of the maps before fc1: conv 5x5, pool 2, conv 5x5, pool 2."""
        return ((n - 4) // 2 - 4) // 2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(torch.relu(self.conv1(x)))
        x = self.pool(torch.relu(self.conv2(x)))
        x = torch.relu(self.fc1(torch.flatten(x, 1)))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


#: GroupNorm groups per layer of resnet18_gn: Reddi et al. 2021 (Appendix: ResNet-18 with
#: group norm, two groups per layer), following Hsieh et al. 2020 ("The Non-IID Data
#: Quagmire of Decentralized Machine Learning"), whose GroupNorm used 2 groups
GN_GROUPS = 2


class GNBasicBlock(nn.Module):
    """ResNet basic block with GroupNorm; a 1x1 projection (+ GroupNorm) shortcut when
    the shape changes."""

    def __init__(self, c_in: int, c_out: int, stride: int, groups: int = GN_GROUPS):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.gn2 = nn.GroupNorm(groups, c_out)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.GroupNorm(groups, c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.gn1(self.conv1(x)))
        out = self.gn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18GN(nn.Module):
    """ResNet-18 with GroupNorm (2 groups per layer, :data:`GN_GROUPS`) in place of
    BatchNorm and a CIFAR stem: the model of Reddi et al. 2021 ("Adaptive Federated
    Optimization", ICLR) for CIFAR-10/100.

    Layers: conv 3x3 64 stride 1 (no max-pool) + GN; four stages of two basic blocks
    with 64, 128, 256, 512 channels (strides 1, 2, 2, 2; 1x1 projection shortcuts);
    global average pool; linear classifier. 11,173,962 parameters for 10 classes.
    Structured pruning removes whole GroupNorm groups (fl.pruning.groups), so every
    GroupNorm keeps its channels-per-group and the pruned model is exact.
    """

    def __init__(self, input_shape: tuple[int, int, int], num_classes: int,
                 groups: int = GN_GROUPS):
        super().__init__()
        c = input_shape[0]
        self.conv1 = nn.Conv2d(c, 64, 3, padding=1, bias=False)
        self.gn1 = nn.GroupNorm(groups, 64)
        stages, c_in = [], 64
        for c_out, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            stages.append(nn.Sequential(GNBasicBlock(c_in, c_out, stride, groups),
                                        GNBasicBlock(c_out, c_out, 1, groups)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(512, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.gn1(self.conv1(x)))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.pool(x), 1))


class CharLSTM(TokenModel):
    """Next-character model of LEAF's Shakespeare task (Caldas et al. 2018,
    models/shakespeare/stacked_lstm.py), also used by FedProx (Li et al., MLSys 2020):
    an embedding of dimension 8 over the vocabulary, two LSTM layers of 256 units, a
    linear classifier over the vocabulary from the last time step's output.

    Input: int64 character ids ``(N, sequence length)`` (LEAF: 80 characters; the
    vocabulary is ``num_classes``, 80 in LEAF). The two layers are two single-layer
    ``nn.LSTM`` modules (``lstm1``, ``lstm2``), the same computation as one
    ``nn.LSTM(num_layers=2)``, so that pruning sees the coupling between them.
    AutoFLIP prunes the LSTM and linear weights unstructured, and hidden units
    structurally: one unit is a row in each of the four gates (i, f, g, o) of its
    layer, its recurrent column and the next layer's input column (fl.pruning.groups).
    """

    def __init__(self, seq_len: int, num_classes: int, embed: int = 8, hidden: int = 256):
        super().__init__()
        self.seq_len = seq_len
        self.embedding = nn.Embedding(num_classes, embed)
        self.lstm1 = nn.LSTM(embed, hidden, batch_first=True)
        self.lstm2 = nn.LSTM(hidden, hidden, batch_first=True)
        self.fc = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, _ = self.lstm1(self.embedding(x))
        h, _ = self.lstm2(h)
        return self.fc(h[:, -1])


def _checked(name: str, input_shape: tuple[int, ...]) -> tuple[int, ...]:
    problem = config.input_problem(name, input_shape)
    if problem:
        raise ValueError(f"model: {name!r} {problem}")
    return tuple(int(s) for s in input_shape)


@register_model("mlp")
def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes)


@register_model("cnn")
def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CNN(_checked("cnn", input_shape), num_classes)


@register_model("resnet8")
def _resnet8(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet8(_checked("resnet8", input_shape), num_classes)


@register_model("cnn_fedavg")
def _cnn_fedavg(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return TwoConvCNN(_checked("cnn_fedavg", input_shape), num_classes, hidden=512)


@register_model("cnn_leaf")
def _cnn_leaf(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return TwoConvCNN(_checked("cnn_leaf", input_shape), num_classes, hidden=2048)


@register_model("lenet")
def _lenet(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return LeNet(_checked("lenet", input_shape), num_classes)


@register_model("resnet18_gn")
def _resnet18_gn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet18GN(_checked("resnet18_gn", input_shape), num_classes)


@register_model("char_lstm")
def _char_lstm(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CharLSTM(_checked("char_lstm", input_shape)[0], num_classes)
