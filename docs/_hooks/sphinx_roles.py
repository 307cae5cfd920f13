"""MkDocs hook: render the Sphinx roles used in tilefn's docstrings as cross-references.

The docstrings are Google style but refer to objects as ``:func:`streamify``` or
``:class:`~tilefn.TilePlan```. mkdocstrings leaves the role prefix in the text; this hook
turns each such reference into an optional mkdocs-autorefs link (plain code when the target
is not documented), and drops the ``~`` prefix as Sphinx would.
"""

from __future__ import annotations

import re

_ROLE = re.compile(r":(?:func|class|meth|attr|exc|mod|data|obj):<code>(~?)([\w.]+)(\(\))?</code>")

_RULES = {
    "pointwise",
    "OpCall",
    "OpGeometry",
    "TensorArg",
    "Refuse",
    "DimMap",
    "Identity",
    "Window",
    "TransposedWindow",
    "Upsample",
    "Reflect",
}
_MODULE_METHODS = {
    "configure_optimizers",
    "on_before_optimizer_step",
    "on_train_epoch_end",
    "train",
    "unpack_batch",
    "forward",
}


def _identifier(name: str) -> str:
    if name.startswith("tilefn."):
        return name
    if name in _RULES:
        return f"tilefn.rules.{name}"
    if name in _MODULE_METHODS:
        return f"tilefn.lightning.StreamedModule.{name}"
    return f"tilefn.{name}"


def _replace(match: re.Match[str]) -> str:
    tilde, name, call = match.group(1), match.group(2), match.group(3) or ""
    shown = name.rsplit(".", 1)[-1] if tilde else name
    return (
        f'<autoref identifier="{_identifier(name)}" optional><code>{shown}{call}</code></autoref>'
    )


def on_page_content(html: str, **kwargs: object) -> str:
    return _ROLE.sub(_replace, html)
