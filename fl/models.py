"""Model registry: small networks for federated training on CPUs and edge devices.

Every model is built by name from ``(input_shape, num_classes)`` so that the
server, the clients and the pruning code construct identical architectures.
Layer attribute names are stable (``conv1``, ``fc1``, ...) because the pruning
code and the wire format address tensors by their state-dict names.
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
    model with the same seed (ALGORITHMS.md 1.1).
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
            model(torch.empty((1, *shape)))
    except RuntimeError as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ValueError(f"model: {name!r} cannot take inputs of shape {shape} ({first})") from None
    return params


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
    structured pruning must respect (ALGORITHMS.md 1.2).
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


def _image_shape(name: str, input_shape: tuple[int, ...]) -> tuple[int, int, int]:
    if len(input_shape) != 3:
        raise ValueError(
            f"model: {name!r} needs image inputs (channels, height, width), got shape {input_shape}"
        )
    return (int(input_shape[0]), int(input_shape[1]), int(input_shape[2]))


@register_model("mlp")
def _mlp(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(math.prod(input_shape), num_classes)


@register_model("cnn")
def _cnn(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return CNN(_image_shape("cnn", input_shape), num_classes)


@register_model("resnet8")
def _resnet8(input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResNet8(_image_shape("resnet8", input_shape), num_classes)
