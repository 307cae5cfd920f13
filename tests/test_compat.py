"""Every PyTorch internal tilefn relies on still exists and behaves as ``_compat`` assumes.

When a PyTorch upgrade moves one of them, the failing test names it; the fix belongs in
``tilefn/_compat.py`` alone.
"""

from __future__ import annotations

import ast
from pathlib import Path

import torch
from torch import nn

from tilefn import _compat

aten = torch.ops.aten
PACKAGE = Path(__file__).resolve().parents[1] / "tilefn"


def test_pytree_round_trip() -> None:
    tree = {"a": torch.zeros(1), "b": (torch.ones(2), [torch.zeros(3)])}
    leaves, spec = _compat.tree_flatten(tree)
    assert len(leaves) == 3 and isinstance(spec, _compat.TreeSpec)
    again = _compat.tree_unflatten(leaves, spec)
    assert again.keys() == tree.keys() and again["b"][1][0] is leaves[2]
    assert _compat.tree_map(lambda t: t + 1, tree)["a"].item() == 1.0


def test_dispatch_mode_sees_aten_ops() -> None:
    seen = []

    class Mode(_compat.TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return func(*args, **(kwargs or {}))

    with Mode():
        torch.relu(torch.zeros(2))
    assert aten.relu.default in seen
    assert isinstance(seen[0], _compat.OpOverload)


def test_op_overloads_and_names() -> None:
    assert isinstance(aten.add, _compat.OpOverloadPacket)
    overloads = list(_compat.op_overloads(aten.add))
    assert aten.add.Tensor in overloads
    assert _compat.op_name(aten.convolution.default) == ("aten", "convolution")


def test_op_arguments_bind_names_and_defaults() -> None:
    args = _compat.op_arguments(aten.convolution.default)
    names = [name for name, _, _ in args]
    assert names[:3] == ["input", "weight", "bias"] and "stride" in names
    pool = dict((n, (has, d)) for n, has, d in _compat.op_arguments(aten.max_pool2d.default))
    assert pool["ceil_mode"] == (True, False)


def test_writes_argument_and_is_view() -> None:
    assert _compat.writes_argument(aten.add_.Tensor, 0)
    assert not _compat.writes_argument(aten.add.Tensor, 0)
    assert not _compat.writes_argument(aten.add_.Tensor, 99)
    x = torch.zeros(4)
    assert _compat.is_view(x[1:]) and not _compat.is_view(x)


def test_batchnorm_base_covers_every_batchnorm() -> None:
    for cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm):
        assert issubclass(cls, _compat.BatchNormBase)
    assert not issubclass(nn.InstanceNorm2d, _compat.BatchNormBase)


def test_share_registries_makes_one_module_the_other() -> None:
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    other = nn.Module()
    _compat.share_registries(other, model)
    assert other.state_dict().keys() == model.state_dict().keys()
    assert list(other.parameters()) == list(model.parameters())


def test_no_other_module_imports_torch_internals() -> None:
    """Private torch modules (``torch._ops``, ``torch.utils._pytree``, ...) and private
    attributes of tensors, ops and modules are used in ``_compat`` only."""
    offenders = []
    for path in sorted(PACKAGE.glob("*.py")):
        if path.name == "_compat.py":
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("torch"):
                private = any(part.startswith("_") for part in node.module.split("."))
                if private:
                    offenders.append(f"{path.name}: from {node.module} import ...")
            if isinstance(node, ast.Attribute) and node.attr in (
                "_schema",
                "_base",
                "_parameters",
                "_buffers",
                "_modules",
                "_BatchNorm",
                "_pytree",
                "_python_dispatch",
                "_ops",
                "_forward_hooks",
                "_forward_pre_hooks",
            ):
                offenders.append(f"{path.name}:{node.lineno}: .{node.attr}")
    assert not offenders, offenders


def test_outside_functorch_hides_ops_from_transforms() -> None:
    def f(x: torch.Tensor) -> torch.Tensor:
        with _compat.outside_functorch():
            inner = torch.zeros(3) + 1  # a plain tensor, not one the transform tracks
        assert type(inner) is torch.Tensor
        return (x * inner).sum()

    assert torch.func.grad(f)(torch.ones(3)).tolist() == [1.0, 1.0, 1.0]


def test_module_hooks_sees_registered_hooks() -> None:
    m = nn.Conv2d(1, 1, 1)
    assert _compat.module_hooks(m) == ()
    handle = m.register_forward_hook(lambda *a: None)
    assert len(_compat.module_hooks(m)) == 1
    handle.remove()
    assert _compat.module_hooks(m) == ()
