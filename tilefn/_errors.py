"""The exception family of tilefn, defined once.

Every error tilefn raises on purpose derives from :class:`TilefnError`. Each
subclass also derives from the builtin that fits (``ValueError`` for a bad
value, ``TypeError`` for a bad type or option), so ``except ValueError`` keeps
working for callers that do not know tilefn.
"""

from __future__ import annotations

__all__ = [
    "TilefnError",
    "UnsupportedLayerError",
    "TileSizeError",
    "InputError",
    "InputTypeError",
    "OptionError",
    "TraceError",
    "PlanError",
    "TransformError",
]


class TilefnError(Exception):
    """Base class of every error raised by tilefn."""


class UnsupportedLayerError(TilefnError, ValueError):
    """A layer (or an op inside a layer) cannot be computed tile by tile.

    The message names the layer by its module path, says why it cannot be
    streamed and what to do about it.
    """


class TileSizeError(TilefnError, ValueError):
    """``tile_size`` is invalid or too small for the network's receptive field."""


class InputError(TilefnError, ValueError):
    """The input has a bad shape or value (rank, empty dims, ...)."""


class InputTypeError(TilefnError, TypeError):
    """The input has a bad type or dtype."""


class OptionError(TilefnError, TypeError):
    """An unknown or ill-typed option was passed to a tilefn function."""


class TraceError(TilefnError, RuntimeError):
    """The model could not be recorded on a meta tensor to compute its geometry."""


class PlanError(TilefnError, RuntimeError):
    """The model's sizes behave in a way the tiling plan cannot reproduce exactly."""


class TransformError(TilefnError, RuntimeError):
    """A PyTorch transform of a streamed backbone that tilefn cannot compute exactly
    (forward mode, double backward, vmap); the message says what to do instead."""


def see_docs(section: str = "") -> str:
    """The sentence that points an error message at the documentation page that explains
    it: the page ``Limitations`` of the tilefn documentation, at ``section`` if given (a
    heading of that page, e.g. ``"Circular padding"``)."""
    where = f"'Limitations > {section}'" if section else "'Limitations'"
    return f"See {where} in the tilefn documentation."
