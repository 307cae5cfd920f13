"""The options of ``streamify`` are defined once (``tilefn.StreamOptions``), validated once and
documented everywhere a user looks for them."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
import torch

import tilefn

ROOT = Path(__file__).resolve().parents[1]
NAMES = tilefn.StreamOptions.names()


def test_the_options_are_the_fields_of_stream_options() -> None:
    assert NAMES == tuple(f.name for f in dataclasses.fields(tilefn.StreamOptions))
    assert set(NAMES) >= {"saliency", "normalize", "memory_budget", "crop_batch"}


def _documented(text: str, name: str) -> bool:
    return re.search(rf"(``|`|\b){name}(``|`|\b)", text) is not None


@pytest.mark.parametrize("name", NAMES)
def test_every_option_is_documented_everywhere(name: str) -> None:
    from tilefn.lightning import StreamedModule

    attributes = tilefn.StreamOptions.__doc__.split("Attributes:")[1]
    assert re.search(rf"^\s+{name}: \S", attributes, re.M), "StreamOptions docstring"
    assert _documented(tilefn.streamify.__doc__.split("**options")[1], name), "streamify"
    assert _documented(StreamedModule.__doc__.split("**stream_options")[1], name), "adapter"
    readme = (ROOT / "README.md").read_text()
    table = readme.split("## Options")[1].split("\n## ")[0]
    assert re.search(rf"^\| `{name}` \|", table, re.M), "README options table"


def test_no_documented_option_is_unknown() -> None:
    readme = (ROOT / "README.md").read_text().split("## Options")[1].split("\n## ")[0]
    in_table = re.findall(r"^\| `(\w+)` \|", readme, re.M)
    assert sorted(in_table) == sorted(NAMES)
    attributes = tilefn.StreamOptions.__doc__.split("Attributes:")[1].split("Example:")[0]
    assert re.findall(r"^        (\w+): ", attributes, re.M) == list(NAMES)


def test_options_are_frozen_and_normalised_once() -> None:
    opts = tilefn.StreamOptions(normalize=([0.5], [0.25]), device="cpu", memory_budget=1e6)
    assert opts.normalize == ((0.5,), (0.25,))
    assert opts.device == torch.device("cpu") and opts.memory_budget == 1_000_000
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.saliency = True  # type: ignore[misc]
    backbone, _ = tilefn.streamify(torch.nn.Conv2d(1, 1, 3), 16, saliency=True)
    assert backbone.options == tilefn.StreamOptions(saliency=True)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"verbose": 1}, r"^streamify: option verbose must be True or False"),
        ({"channels_last": "yes"}, r"^streamify: option channels_last must be True or False"),
        ({"crop_batch": 0}, r"^streamify: crop_batch must be an int >= 1"),
        ({"device": 3.5}, r"^streamify: device must be"),
        ({"memory_budget": "8G"}, r"^streamify: memory_budget must be a number of bytes"),
        ({"normalize": ("ab", "cd")}, r"^streamify: normalize must be \(mean, std\)"),
        ({"process_group": object()}, r"^streamify: process_group= needs an initialised"),
    ],
)
def test_bad_values_raise_option_errors(kwargs: dict, match: str) -> None:
    with pytest.raises(tilefn.OptionError, match=match):
        tilefn.StreamOptions(**kwargs)
    with pytest.raises(tilefn.OptionError, match=match):
        tilefn.streamify(torch.nn.Conv2d(1, 1, 3), 16, **kwargs)


def test_unknown_options_are_listed_with_the_valid_ones() -> None:
    with pytest.raises(tilefn.OptionError, match=r"unknown options \['tile'\]; valid options"):
        tilefn.StreamOptions.from_kwargs({"tile": 3})
