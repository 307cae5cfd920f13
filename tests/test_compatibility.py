"""docs/compatibility.md is what benchmarks/compatibility.py generates now (slow: it plans
about 35 networks of timm, smp, MONAI and torchvision from shapes only)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_compatibility_table_is_up_to_date() -> None:
    for module in ("timm", "segmentation_models_pytorch", "monai"):
        pytest.importorskip(module)
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import compatibility
    finally:
        sys.path.pop(0)
    page = (ROOT / "docs" / "compatibility.md").read_text()
    committed = page.split(compatibility.START)[1].split(compatibility.END)[0].strip()
    assert compatibility.table() == committed, (
        "docs/compatibility.md is out of date: run "
        "python benchmarks/compatibility.py --doc docs/compatibility.md"
    )
