"""Split a torchvision classification model into a streamable trunk and a global head."""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ._errors import InputTypeError, OptionError
from ._trace import RunningStats

__all__ = ["split", "SpatialMean"]


class SpatialMean(nn.Module):
    """``x.mean(dims)``: the global average pool some torchvision models write inline.

    ShuffleNetV2 and MNASNet average over the spatial dims with ``x.mean([2, 3])`` in their
    ``forward`` instead of an ``nn.AdaptiveAvgPool2d``; :func:`split` puts this module in
    their heads so that ``head(trunk(x))`` repeats that exact op.
    """

    def __init__(self, dims: tuple[int, ...] = (2, 3)) -> None:
        super().__init__()
        self.dims = tuple(dims)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(list(self.dims))

    def extra_repr(self) -> str:
        return f"dims={self.dims}"


# A part of the trunk or head: the name of a child module of the model (shared, not copied),
# or (name, factory) for a parameter-free module that the model's forward applies functionally.
_Part = str | tuple[str, Callable[[], nn.Module]]
_Init = Callable[[nn.Module], None]

_FLATTEN: _Part = ("flatten", lambda: nn.Flatten(1))


def _init_default(layer: nn.Module) -> None:
    """PyTorch's own init, as the torchvision constructor leaves it."""


def _init_zero_bias(layer: nn.Module) -> None:
    nn.init.zeros_(layer.bias)


def _init_normal(std: float) -> _Init:
    def init(layer: nn.Module) -> None:
        nn.init.normal_(layer.weight, 0.0, std)
        nn.init.zeros_(layer.bias)

    return init


def _init_trunc_normal(layer: nn.Module) -> None:
    nn.init.trunc_normal_(layer.weight, std=0.02)
    nn.init.zeros_(layer.bias)


def _init_efficientnet(layer: nn.Module) -> None:
    bound = 1.0 / math.sqrt(layer.out_features)
    nn.init.uniform_(layer.weight, -bound, bound)
    nn.init.zeros_(layer.bias)


def _init_mnasnet(layer: nn.Module) -> None:
    nn.init.kaiming_uniform_(layer.weight, mode="fan_out", nonlinearity="sigmoid")
    nn.init.zeros_(layer.bias)


@dataclass(frozen=True)
class _Family:
    name: str  # the torchvision class, in torchvision.models
    members: str  # for messages: the constructors of the family
    trunk: tuple[_Part, ...]
    head: tuple[_Part, ...]
    init: _Init  # how torchvision initialises the final layer of this family
    methods: tuple[str, ...] = ("forward",)  # must be torchvision's own: they define the order


_FAMILIES: tuple[_Family, ...] = (
    _Family(
        "ResNet",
        "resnet18/34/50/101/152, resnext*, wide_resnet*",
        ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4"),
        ("avgpool", _FLATTEN, "fc"),
        _init_default,
        ("forward", "_forward_impl"),
    ),
    _Family(
        "ConvNeXt",
        "convnext_tiny/small/base/large",
        ("features",),
        ("avgpool", "classifier"),
        _init_trunc_normal,
    ),
    _Family(
        "VGG",
        "vgg11/13/16/19, with or without _bn",
        ("features",),
        ("avgpool", _FLATTEN, "classifier"),
        _init_normal(0.01),
    ),
    _Family(
        "AlexNet",
        "alexnet",
        ("features",),
        ("avgpool", _FLATTEN, "classifier"),
        _init_default,
    ),
    _Family(
        "DenseNet",
        "densenet121/161/169/201",
        ("features", ("relu", lambda: nn.ReLU())),
        (("avgpool", lambda: nn.AdaptiveAvgPool2d((1, 1))), _FLATTEN, "classifier"),
        _init_zero_bias,
    ),
    _Family(
        "MobileNetV2",
        "mobilenet_v2",
        ("features",),
        (("avgpool", lambda: nn.AdaptiveAvgPool2d((1, 1))), _FLATTEN, "classifier"),
        _init_normal(0.01),
    ),
    _Family(
        "EfficientNet",
        "efficientnet_b0..b7, efficientnet_v2_s/m/l (squeeze-excitation: staged streaming)",
        ("features",),
        ("avgpool", _FLATTEN, "classifier"),
        _init_efficientnet,
    ),
    _Family(
        "MobileNetV3",
        "mobilenet_v3_small/large (squeeze-excitation: staged streaming)",
        ("features",),
        ("avgpool", _FLATTEN, "classifier"),
        _init_normal(0.01),
    ),
    _Family(
        "RegNet",
        "regnet_x_*, regnet_y_* (squeeze-excitation: staged streaming)",
        ("stem", "trunk_output"),
        ("avgpool", _FLATTEN, "fc"),
        _init_normal(0.01),
    ),
    _Family(
        "ShuffleNetV2",
        "shufflenet_v2_x0_5/x1_0/x1_5/x2_0",
        ("conv1", "maxpool", "stage2", "stage3", "stage4", "conv5"),
        (("avgpool", SpatialMean), "fc"),
        _init_default,
        ("forward", "_forward_impl"),
    ),
    _Family(
        "MNASNet",
        "mnasnet0_5/0_75/1_0/1_3",
        ("layers",),
        (("avgpool", SpatialMean), "classifier"),
        _init_mnasnet,
    ),
    _Family(
        "SqueezeNet",
        "squeezenet1_0/1_1",
        ("features",),
        ("classifier", _FLATTEN),
        _init_normal(0.01),
    ),
)

_HOW_TO_SPLIT_BY_HAND = """\
Split it by hand: the trunk gets every local layer (convolutions, local pooling, activations,
residual blocks, BatchNorm, per-pixel LayerNorm), the head everything that needs the whole
image (global pooling, flatten, fully connected layers). Reuse the model's modules, so that
parameters are shared and head(trunk(x)) is model(x):

    trunk = nn.Sequential(model.stem, model.blocks)          # streamed by tilefn
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1), model.fc)
    assert torch.equal(head(trunk(x)), model(x))             # in eval mode
    backbone, _ = tilefn.streamify(trunk, tile_size)"""


def split(
    model: nn.Module, *, num_classes: int | None = None
) -> tuple[nn.Sequential, nn.Sequential]:
    """Split a torchvision classifier into a streamable ``trunk`` and a global ``head``.

    ``head(trunk(x))`` computes exactly ``model(x)``: both parts are ``nn.Sequential``
    containers of the model's own modules (shared, not copied, so they train the model's
    parameters), plus the parameter-free ops its ``forward`` applies functionally (flatten,
    DenseNet's final ReLU, global averages). The trunk holds everything local, which
    :func:`tilefn.streamify` streams tile by tile: convolutions, pooling, BatchNorm, residual
    and ConvNeXt blocks with their stochastic depth and layer scale. The head holds what needs
    the whole image: global pooling, flatten and the classifier. Child names are kept, so
    ``trunk.state_dict()`` and ``head.state_dict()`` use the model's own keys.

    Supported families (torchvision.models classes): ResNet (resnet, resnext, wide_resnet),
    ConvNeXt, VGG (with and without batch norm), AlexNet, DenseNet, MobileNetV2, RegNet
    (X variants), ShuffleNetV2, MNASNet, SqueezeNet. timm models are split into their own
    ``forward_features`` (the trunk) and ``forward_head`` (the head), each holding the
    children it runs (found by running both once on a small zero image); whether the trunk
    streams depends on the family (squeeze-excitation is refused by :func:`streamify`).

    Args:
        model: A torchvision classification model. Its class must be torchvision's (or a
            subclass that keeps torchvision's ``forward``).
        num_classes: If given, the head gets a new final layer with this many outputs,
            initialised as torchvision initialises that family's classifier, with the old
            layer's dtype, device and train/eval mode. The model itself is not modified.

    Returns:
        ``(trunk, head)``, two ``nn.Sequential`` (for timm models, two modules that call the
        model's ``forward_features`` and ``forward_head``).

    Raises:
        InputTypeError: ``model`` is not a model of a supported family (the message lists
            them and shows how to split a model by hand), or overrides its ``forward``.
        OptionError: ``num_classes`` is not a positive int.

    Example:
        >>> import torch, torchvision, tilefn
        >>> model = torchvision.models.resnet18(weights=None).eval()
        >>> trunk, head = tilefn.split(model)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> torch.equal(head(trunk(x)), model(x))
        True
        >>> trunk.layer4 is model.layer4, [type(m).__name__ for m in head]
        (True, ['AdaptiveAvgPool2d', 'Flatten', 'Linear'])
        >>> backbone, _ = tilefn.streamify(trunk, tile_size=512)
        >>> trunk, head = tilefn.split(model, num_classes=2)
        >>> head(backbone(x)).shape
        torch.Size([1, 2])
    """
    if num_classes is not None and (
        isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1
    ):
        raise OptionError(f"split: num_classes must be a positive int or None, got {num_classes!r}")
    if _is_timm(model):
        return _split_timm(model, num_classes)
    family = _family_of(model)
    if family is None:
        raise InputTypeError(_unknown_message(model))
    overridden = _overridden(model, family)
    if overridden:
        raise InputTypeError(
            f"split: {_qualname(model)} subclasses torchvision's {family.name} but overrides "
            f"{overridden}(), so split() cannot know which layers it runs in which order.\n"
            + _HOW_TO_SPLIT_BY_HAND
        )
    trunk = _build(model, family.trunk)
    head = _build(model, family.head)
    if num_classes is not None:
        head = _replace_final_layer(head, num_classes, family.init)
    return trunk, head


# ----------------------------------------------------------------------------- timm

# The children of timm models that forward_head uses (the rest is forward_features).
_TIMM_HEAD_CHILDREN = (
    "global_pool",
    "head_drop",
    "pre_logits",
    "fc_norm",
    "head",
    "fc",
    "classifier",
)


def _is_timm(model: object) -> bool:
    return (
        isinstance(model, nn.Module)
        and type(model).__module__.startswith("timm.")
        and callable(getattr(model, "forward_features", None))
        and callable(getattr(model, "forward_head", None))
    )


class TimmPart(nn.Module):
    """One side of a split timm model: the model's own ``forward_features`` (the trunk) or
    ``forward_head`` (the head), holding exactly the children that side uses (the same
    modules as the model's, under the model's names)."""

    def __init__(self, model: nn.Module, method: str, children: list[str]):
        super().__init__()
        object.__setattr__(self, "_timm_model", model)
        self.method = method
        for name in children:
            self.add_module(name, getattr(model, name))
        self.training = model.training

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return getattr(self._timm_model, self.method)(x)

    def extra_repr(self) -> str:
        return f"{type(self._timm_model).__name__}.{self.method}"


def _split_timm(model: nn.Module, num_classes: int | None) -> tuple[nn.Module, nn.Module]:
    name = type(model).__name__
    if num_classes is not None:
        raise OptionError(
            f"split: for timm models ({name}) create the model with the classes you want, "
            "timm.create_model(name, pretrained=False, num_classes=...), and split it without "
            "num_classes (split never modifies the model)."
        )
    children = [n for n, _ in model.named_children()]
    in_features, in_head = _children_run(model)
    shared = sorted(set(in_features or []) & set(in_head))
    if shared or in_features is None:
        why = (
            f"forward_features and forward_head both run {shared[0]!r}"
            if shared
            else "its forward_features could not be run on a small probe input"
        )
        raise InputTypeError(
            f"split: {name} cannot be split by its children: {why}.\n" + _HOW_TO_SPLIT_BY_HAND
        )
    head_names = [
        n for n in children if n in in_head or (n in _TIMM_HEAD_CHILDREN and n not in in_features)
    ]
    trunk = TimmPart(model, "forward_features", [n for n in children if n not in head_names])
    head = TimmPart(model, "forward_head", head_names)
    return trunk, head


def _children_run(model: nn.Module) -> tuple[list[str] | None, list[str]]:
    """The children ``model.forward_features`` runs and those ``forward_head`` runs, on a
    small zero image (None: forward_features could not run on it)."""
    seen: dict[str, list[str]] = {"features": [], "head": []}
    phase = ["features"]
    handles = [
        child.register_forward_pre_hook(lambda m, a, n=n: seen[phase[0]].append(n))
        for n, child in model.named_children()
    ]
    channels = getattr(model, "pretrained_cfg", {}).get("input_size", (3,))[0]
    p = next(model.parameters(), torch.empty(()))
    probe = torch.zeros(1, channels, 224, 224, dtype=p.dtype, device=p.device)
    try:  # BatchNorm on running statistics and a forked RNG: the probe changes nothing
        with torch.no_grad(), torch.random.fork_rng(devices=[]), RunningStats(model):
            features = model.forward_features(probe)
            phase[0] = "head"
            model.forward_head(features)
    except Exception:  # noqa: BLE001 - a model that cannot run on the probe is refused
        if phase[0] == "features":
            return None, []
    finally:
        for h in handles:
            h.remove()
    return seen["features"], seen["head"]


# ----------------------------------------------------------------------------- helpers


def _qualname(obj: object) -> str:
    cls = type(obj)
    return f"{cls.__name__} ({cls.__module__}.{cls.__qualname__})"


def _family_of(model: object) -> _Family | None:
    if not isinstance(model, nn.Module):
        return None
    from torchvision import models  # lazily: importing torchvision takes a while

    for family in _FAMILIES:
        if isinstance(model, getattr(models, family.name)):
            return family
    return None


def _overridden(model: nn.Module, family: _Family) -> str | None:
    from torchvision import models

    base = getattr(models, family.name)
    for method in family.methods:
        if getattr(type(model), method, None) is not getattr(base, method, None):
            return method
    return None


def _build(model: nn.Module, parts: tuple[_Part, ...]) -> nn.Sequential:
    modules: OrderedDict[str, nn.Module] = OrderedDict()
    for part in parts:
        if isinstance(part, str):
            modules[part] = getattr(model, part)
        else:
            name, factory = part
            new = factory()
            new.training = model.training
            modules[name] = new
    seq = nn.Sequential(modules)
    seq.training = model.training  # the container only; the model's modules keep their modes
    return seq


def _unknown_message(model: object) -> str:
    families = "\n".join(f"    {f.name:<13} {f.members}" for f in _FAMILIES)
    if isinstance(model, nn.Module):
        children = ", ".join(f"{n!r} ({type(m).__name__})" for n, m in model.named_children())
        what = f"a {_qualname(model)}"
        if children:
            what += f", whose top-level modules are {children}"
        from ._api import StreamedBackbone

        if isinstance(model, StreamedBackbone):
            what += ". Split the plain model first, then streamify its trunk"
    else:
        what = f"{_qualname(model)}, which is not an nn.Module"
    return (
        f"split: don't know how to split {what}.\n"
        f"split() knows these torchvision classification families (torchvision.models):\n"
        f"{families}\n"
        "Not streamable at all: models with squeeze-excitation (EfficientNet, MobileNetV3, "
        "RegNetY) or attention (ViT, Swin, MaxViT) inside the trunk.\n" + _HOW_TO_SPLIT_BY_HAND
    )


def _replace_final_layer(head: nn.Sequential, num_classes: int, init: _Init) -> nn.Sequential:
    """A copy of ``head`` (sharing all other modules) whose last Linear/Conv2d is fresh."""
    candidates = [
        (path, m) for path, m in head.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ]
    if not candidates:  # pragma: no cover - every supported head ends in one
        raise InputTypeError("split: found no final Linear or Conv2d layer in the head to replace")
    path, old = candidates[-1]
    factory = {"device": old.weight.device, "dtype": old.weight.dtype}
    if isinstance(old, nn.Linear):
        new: nn.Module = nn.Linear(old.in_features, num_classes, old.bias is not None, **factory)
    else:
        new = nn.Conv2d(
            old.in_channels,
            num_classes,
            old.kernel_size,
            old.stride,
            old.padding,
            old.dilation,
            old.groups,
            old.bias is not None,
            old.padding_mode,
            **factory,
        )
    with torch.no_grad():
        init(new)
    new.train(old.training)
    return _with_module(head, path.split("."), new)


def _with_module(container: nn.Module, path: list[str], new: nn.Module) -> nn.Sequential:
    """A new Sequential like ``container`` (same children) with the module at ``path`` replaced."""
    if not isinstance(container, nn.Sequential):  # pragma: no cover - torchvision heads are
        raise InputTypeError(f"split: cannot replace a layer inside a {type(container).__name__}")
    first, rest = path[0], path[1:]
    children = OrderedDict(container.named_children())
    children[first] = new if not rest else _with_module(children[first], rest, new)
    seq = nn.Sequential(children)
    seq.training = container.training
    return seq
