"""Public pieces for writing geometry rules for custom ops (see :func:`tilefn.register_rule`)."""

from ._geometry import DimMap, Identity, Reflect, TransposedWindow, Upsample, Window
from ._rules import OpCall, OpGeometry, Refuse, TensorArg, pointwise, register_rule

__all__ = ["register_rule", "pointwise", "OpCall", "OpGeometry", "TensorArg", "Refuse"]
__all__ += ["DimMap", "Identity", "Window", "TransposedWindow", "Upsample", "Reflect"]
