"""Every PyTorch internal that tilefn relies on, behind one door.

PyTorch's private modules and attributes (``torch.utils._pytree``, dispatch modes, op
overload objects and their schemas, ``Tensor._base``, ``nn.Module``'s registries) change
between releases without notice. Nothing else in tilefn imports or touches them:
everything goes through the names below, so a PyTorch upgrade that moves one of them
breaks exactly one file, and ``tests/test_compat.py`` says which name moved.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn
from torch._ops import OpOverload, OpOverloadPacket
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import TreeSpec, tree_flatten, tree_map, tree_unflatten

__all__ = [
    "BatchNormBase",
    "OpOverload",
    "OpOverloadPacket",
    "TorchDispatchMode",
    "TreeSpec",
    "tree_flatten",
    "tree_map",
    "tree_unflatten",
    "op_name",
    "op_overloads",
    "op_arguments",
    "writes_argument",
    "is_view",
    "share_registries",
    "outside_functorch",
    "requires_grad_allowed",
    "unwrapped",
    "module_hooks",
]

#: Base class of BatchNorm1d/2d/3d and SyncBatchNorm (the layers with running statistics).
BatchNormBase: type[nn.Module] = nn.modules.batchnorm._BatchNorm


def op_name(op: OpOverload) -> tuple[str, str]:
    """``(namespace, name)`` of an op overload, e.g. ``("aten", "convolution")``."""
    namespace, name = op._schema.name.split("::")
    return namespace, name


def op_overloads(packet: OpOverloadPacket) -> Iterator[OpOverload]:
    """Every overload of an op packet (``aten.add`` -> ``aten.add.Tensor``, ...)."""
    for name in packet.overloads():
        yield getattr(packet, name)


def op_arguments(op: OpOverload) -> list[tuple[str, bool, Any]]:
    """The schema arguments of an op: ``(name, has_default, default)`` in order."""
    return [
        (a.name, a.has_default_value(), a.default_value if a.has_default_value() else None)
        for a in op._schema.arguments
    ]


def writes_argument(op: OpOverload, position: int) -> bool:
    """Whether the op writes in place into its positional argument ``position``."""
    arguments = op._schema.arguments
    if position >= len(arguments):
        return False
    info = arguments[position].alias_info
    return info is not None and info.is_write


def is_view(t: torch.Tensor) -> bool:
    """Whether ``t`` is a view of another tensor."""
    return t._base is not None


def share_registries(dst: nn.Module, src: nn.Module) -> None:
    """Make ``dst`` share ``src``'s parameters, buffers and submodules (the same dicts), so
    that to ``nn.Module`` (state_dict, ``.to()``, optimizers) ``dst`` *is* ``src``."""
    for name in ("_parameters", "_buffers", "_modules", "_non_persistent_buffers_set"):
        object.__setattr__(dst, name, getattr(src, name))


def unwrapped(t: torch.Tensor) -> torch.Tensor:
    """The plain tensor inside torch.func's wrappers (``t`` itself when not wrapped): the
    values of a gradient computed under ``torch.func.grad``, to write to a file."""
    fc = torch._C._functorch
    while fc.is_functorch_wrapped_tensor(t):
        t = fc.get_unwrapped(t)
    return t


def outside_functorch() -> Any:
    """A context in which torch.func transforms (grad, vjp, vmap) that are active around it
    do not see the ops run inside: for recording a model on meta tensors while a transform
    of the streamed backbone runs."""
    return torch._C._DisableFuncTorch()


@contextlib.contextmanager
def requires_grad_allowed() -> Any:
    """Allow ``requires_grad_()`` on fresh leaves while a torch.func transform runs (the
    backward of a streamed node under ``torch.func.grad`` makes leaves of its own)."""
    fc = torch._C._functorch
    previous = fc.get_inplace_requires_grad_allowed()
    fc.set_inplace_requires_grad_allowed(True)
    try:
        yield
    finally:
        fc.set_inplace_requires_grad_allowed(previous)


def module_hooks(module: nn.Module) -> tuple[int, ...]:
    """Identities of the forward hooks and pre-hooks registered on ``module``."""
    hooks = (module._forward_pre_hooks, module._forward_hooks)
    return tuple(id(h) for d in hooks for h in d.values())
