"""Models by name, fitted to the prepared data: its channels, image size and number of classes.

The project's own small-cnn and mlp, and every classification model torchvision ships
(`python -m stages models` lists them), built with torchvision's own builders: the classifier
head sized for the data's classes, the first conv for its channels, and resnets with a
small-image stem for small images (`model.small_input_stem`).
"""

from __future__ import annotations

from torch import nn

from ..errors import UserError, first_line
from ..params import (
    BUILT_IN_MODELS,
    DATASETS,
    IMAGE_SIDES,
    MLP,
    SMALL_CNN,
    SMALL_STEM_BELOW,
    ModelName,
    is_resnet,
    torchvision_model_names,
)


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


def mlp(in_channels: int, image_size: int, num_classes: int) -> nn.Module:
    """A two-layer perceptron: no BatchNorm and no dropout, so parallel runs match a single one exactly."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(in_channels * image_size * image_size, 256),
        nn.ReLU(inplace=True),
        nn.Linear(256, num_classes),
    )


# --- torchvision's models -------------------------------------------------------------------


def uses_small_stem(name: str, image_size: int, setting: str | bool = "auto") -> bool:
    """Whether a resnet gets the small-image stem (model.small_input_stem): `auto` gives it to images
    under SMALL_STEM_BELOW px, where the ImageNet stem's 4x downsampling would leave layer4 a 1x1 map."""
    if not is_resnet(name):
        return False
    return image_size < SMALL_STEM_BELOW if setting == "auto" else bool(setting)


def torchvision_options(name: str, image_size: int) -> dict:
    """Builder arguments some torchvision models need besides num_classes."""
    if name in ("googlenet", "inception_v3"):
        # One output in training too (no auxiliary classifiers), and the init torchvision documents.
        return {"aux_logits": False, "init_weights": True}
    if name.startswith("vit_"):
        return {"image_size": image_size}  # patch grid and position embeddings for this size
    if name == "maxvit_t":
        return {"input_size": (image_size, image_size)}
    return {}


def first_conv(model: nn.Module) -> tuple[str, nn.Conv2d]:
    """The stem's conv, the one that sees the image: the first Conv2d in module order (for every
    torchvision classification model: resnet's conv1, vit's conv_proj, features.0.0, ...)."""
    return next((name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def torchvision_model(name: str, in_channels: int, image_size: int, num_classes: int, small_stem: bool,
                      dataset: str | None = None) -> nn.Module:
    from torchvision import models

    try:
        model = models.get_model(name, weights=None, num_classes=num_classes, **torchvision_options(name, image_size))
    except (AssertionError, ValueError) as exc:  # e.g. a ViT whose patches do not tile the image
        raise UserError(cannot_build(name, image_size, exc, dataset)) from None
    if small_stem:
        # A 3x3 stride-1 conv and no max-pool: small images keep their resolution into layer1.
        model.conv1 = nn.Conv2d(in_channels, model.conv1.out_channels, kernel_size=3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    else:
        conv_name, conv = first_conv(model)
        if conv.in_channels != in_channels:  # greyscale data into an RGB architecture
            replace_module(model, conv_name, nn.Conv2d(
                in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                conv.groups, conv.bias is not None, conv.padding_mode))
    return model


def build_model(name: str, in_channels: int, image_size: int, num_classes: int,
                small_input_stem: str | bool = "auto", dataset: str | None = None) -> nn.Module:
    """The model `name` for (in_channels, image_size, image_size) images and `num_classes` classes.
    `small_input_stem` (resnets only): auto, True or False, as model.small_input_stem. `dataset`
    (data.dataset) fits the advice where the model cannot be built for the size."""
    if name == SMALL_CNN:
        return small_cnn(in_channels, image_size, num_classes)
    elif name == MLP:
        return mlp(in_channels, image_size, num_classes)
    elif name not in torchvision_model_names():  # also the allow-list for names read from a model file
        raise UserError(f"model.name = {name!r} is not allowed; expected {ModelName()}")
    small_stem = uses_small_stem(name, image_size, small_input_stem)
    return torchvision_model(name, in_channels, image_size, num_classes, small_stem, dataset)


def built_on_meta(name: str, image_size: int) -> nn.Module | None:
    """torchvision's `name` built for `image_size` on the meta device (shapes only: no memory), or None where
    torchvision refuses the size (at once: its builders check the size before making any layer)."""
    import torch
    from torchvision import models

    try:
        with torch.device("meta"):
            return models.get_model(name, weights=None, **torchvision_options(name, image_size))
    except (AssertionError, ValueError):
        return None


def nearest_sides_that_build(name: str, image_size: int) -> dict[int, nn.Module]:
    """The nearest image sides below and above `image_size` (within data.image_size's range) that torchvision
    builds `name` for, each with the model built on the meta device. Found by trying: each architecture has
    its own rule (a ViT's patches must tile the image; maxvit_t's 7x7 partitions must tile every block's
    map: 221 to 224 px, 445 to 448, ...), which torchvision states only in the assertion that refuses a size,
    and which the weights' documented minimum size is not."""
    found = {}
    for sides in (range(image_size - 1, IMAGE_SIDES.lo - 1, -1), range(image_size + 1, IMAGE_SIDES.hi + 1)):
        side, model = next(((side, m) for side in sides if (m := built_on_meta(name, side)) is not None), (0, None))
        if model is not None:
            found[side] = model
    return found


def cannot_build(name: str, image_size: int, exc: BaseException, dataset: str | None) -> str:
    """The refusal of a size torchvision cannot build `name` for: the rule, the nearest sizes it builds for,
    and advice that fits `dataset` (data.dataset; None: advice for every dataset)."""
    near = nearest_sides_that_build(name, image_size)
    sides = list(near)
    patch = next((m.patch_size for m in near.values() if hasattr(m, "patch_size")), None)  # a ViT's
    if patch:
        rule = f"its {patch}x{patch} patches must tile the image, so a side must be a multiple of {patch}"
    elif sides:
        # torchvision's first sentence: maxvit_t's next, "Consider changing the partition size", is no param
        why = first_line(exc).split(". ")[0]
        nearest = " and ".join(map(str, sides))
        rule = f"{why}; the nearest {'sides' if len(sides) > 1 else 'side'} it builds for: {nearest}"
    else:
        rule = first_line(exc)
    return (f"model.name = {name!r} cannot be built for {image_size}x{image_size} images ({rule}): "
            f"{small_image_advice(dataset, name, sides)}")


def check_input_size(model: nn.Module, name: str, in_channels: int, image_size: int,
                     dataset: str | None = None) -> None:
    """Refuse, before training, images too small for the architecture (inception_v3 under 75 px,
    alexnet under 63 px, ...), naming the reason, torchvision's documented minimum, and advice that
    fits `dataset` (data.dataset; None: advice for every dataset).

    One forward pass of one image, in eval mode (no BatchNorm statistics change), on the meta
    device: shapes only, no arithmetic, whatever the model's size. Should an operator not run on
    the meta device, the same pass runs for real on the CPU and decides (unless the model itself
    was built on the meta device, as check-params builds it: then the train stage decides)."""
    import torch

    if name in BUILT_IN_MODELS:
        return  # both fit any size the params allow
    on_meta = any(t.is_meta for t in model.parameters())
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            try:
                shapes_only = {key: torch.empty_like(t, device="meta")
                               for key, t in [*model.named_parameters(), *model.named_buffers()]}
                torch.func.functional_call(model, shapes_only,
                                           (torch.empty(1, in_channels, image_size, image_size, device="meta"),))
            except NotImplementedError:
                if on_meta:
                    return
                model(torch.zeros(1, in_channels, image_size, image_size))
            except (RuntimeError, ValueError, AssertionError):
                if on_meta:
                    raise
                model(torch.zeros(1, in_channels, image_size, image_size))
    except (RuntimeError, ValueError, AssertionError) as exc:
        raise UserError(f"model.name = {name!r} cannot take {image_size}x{image_size} images "
                        f"({first_line(exc)}){smallest_input(name)}: {small_image_advice(dataset, name)}") from None
    finally:
        model.train(was_training)


def small_image_advice(dataset: str | None, name: str, sides: list[int] | None = None) -> str:
    """What to do about images a model cannot take: only an image folder's size is a param (data.image_size);
    the other datasets' images have one size, so they need a model that fits small images. `sides`: the
    sizes to suggest (default: torchvision's documented minimum, for a model whose forward pass refused)."""
    smallest = min_input_size(name)
    if sides:
        larger = f"set data.image_size to {' or '.join(map(str, sides))}"
    else:
        larger = f"set data.image_size to at least {smallest}" if smallest else "set data.image_size larger"
    models = f"choose a model that fits small images, such as {', '.join(BUILT_IN_MODELS)} or resnet18"
    if dataset is not None and DATASETS[dataset].sized_by_params:
        return f"{larger}, or {models}"
    if dataset is not None:
        return f"data.dataset = {dataset!r} has images of one size: {models}"
    return f"{models} (or, for an image folder, {larger})"


def min_input_size(name: str) -> int | None:
    """torchvision's documented smallest input side for a model's weights (None where it gives none)."""
    from torchvision import models

    smallest = models.get_model_weights(name).DEFAULT.meta.get("min_size")
    return max(smallest) if smallest else None


def smallest_input(name: str) -> str:
    """torchvision's documented smallest input for a model's weights, as a clause of an error message."""
    from torchvision import models

    smallest = models.get_model_weights(name).DEFAULT.meta.get("min_size")
    return f"; torchvision gives {smallest[0]}x{smallest[1]} as its smallest input" if smallest else ""


def classifier_head(model: nn.Module) -> str:
    """The name of the classifier head, the module the data's classes size (resnet's fc, vit's heads.head,
    efficientnet's classifier.1, ...): the last module with parameters of its own, in every model here."""
    return [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None][-1]


def set_backbone_trainable(model: nn.Module, trainable: bool) -> None:
    """Freeze (or unfreeze) every parameter but the classifier head's (train.freeze_epochs). BatchNorm
    statistics still follow the data while frozen, as the model is in training mode."""
    head = classifier_head(model) + "."
    for name, p in model.named_parameters():
        if not name.startswith(head):
            p.requires_grad_(trainable)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
