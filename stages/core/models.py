"""Model builders by name. Each takes the prepared data's channels, image size and class count."""

from __future__ import annotations

from torch import nn

from ..errors import UserError
from ..params import MODELS


def _conv_bn(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """Two conv blocks of two 3x3 convs each; pools while the map is larger than 4x4.

    8x8 digits -> 4x4 -> 2x2; 28x28 MNIST -> 14 -> 7; 32x32 CIFAR -> 16 -> 8.
    A 2x2 adaptive pool keeps some layout before the classifier.
    """
    layers: list[nn.Module] = [*_conv_bn(in_channels, 32), *_conv_bn(32, 32)]
    size = image_size
    if size > 4:
        layers.append(nn.MaxPool2d(2))
        size //= 2
    layers += [*_conv_bn(32, 64), *_conv_bn(64, 64)]
    if size > 4:
        layers.append(nn.MaxPool2d(2))
    layers += [nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(64 * 4, num_classes)]
    return nn.Sequential(*layers)


def resnet18(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """torchvision's ResNet-18 with a stem for small images: 3x3 stride-1 conv, no max-pool."""
    from torchvision.models import resnet18 as tv_resnet18

    model = tv_resnet18(weights=None, num_classes=num_classes)
    model.conv1 = nn.Conv2d(in_channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    model.maxpool = nn.Identity()
    return model


def mlp(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A two-layer perceptron: no BatchNorm and no dropout, so parallel runs match a single one exactly."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


def build_model(name: str, in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    if name == "small-cnn":
        return small_cnn(in_channels, image_size, num_classes)
    elif name == "resnet18":
        return resnet18(in_channels, image_size, num_classes)
    elif name == "mlp":
        return mlp(in_channels, image_size, num_classes)
    raise UserError(f"model.name = {name!r} is not allowed; expected one of {', '.join(MODELS)}")


def is_conv_net(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
