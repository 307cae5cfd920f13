"""tilefn: exact tile-by-tile (streamed) training and inference of CNNs on huge images.

``backbone, streamed_vjp = tilefn.streamify(model, tile_size)``: ``backbone(x)`` equals
``model(x)`` and its gradients are exact for every parameter, while peak memory depends on
the tile size, not on the image size.
"""

from . import _errors, rules
from ._api import Streamed, StreamedBackbone, plan, streamify
from ._calibrate import calibrate_batchnorm
from ._errors import *  # noqa: F403 (the exception family, listed in _errors.__all__)
from ._inputs import ArrayImage, ImageSource, collate
from ._options import StreamOptions
from ._plan import Crop, Span, TilePlan
from ._rules import register_rule
from ._split import split
from ._staged import SegmentedPlan, StagedPlan

__version__ = "0.1.0"

__all__ = [
    "streamify",
    "plan",
    "split",
    "calibrate_batchnorm",
    "register_rule",
    "rules",
    "Streamed",
    "StreamedBackbone",
    "StreamOptions",
    "ArrayImage",
    "ImageSource",
    "collate",
    "TilePlan",
    "StagedPlan",
    "SegmentedPlan",
    "Crop",
    "Span",
    *_errors.__all__,
    "__version__",
]
