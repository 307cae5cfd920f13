"""Every script in examples/ runs: ``--help`` always, and the main example at a tiny size."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest
from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.py"))


def run_example(script: Path, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``script`` in a fresh interpreter that imports tilefn from this checkout."""
    return run_script(script, *args, timeout=timeout)


def test_examples_exist():
    assert EXAMPLES, f"no examples found in {ROOT / 'examples'}"


@pytest.mark.parametrize("script", EXAMPLES, ids=[p.name for p in EXAMPLES])
def test_help(script: Path):
    proc = run_example(script, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "usage:" in proc.stdout


def test_stream_resnet_tiny():
    proc = run_example(
        ROOT / "examples" / "stream_resnet.py",
        *("--size", "512", "--tile", "480", "--steps", "1", "--check-size", "448"),
        timeout=300,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert re.search(r"^step 1/1: loss \d+\.\d+", out, re.MULTILINE), out
    assert "TilePlan" in out, out
    errors = re.findall(r"^  (.+?)\s+max rel\. error (\S+)$", out, re.MULTILINE)
    names = {name for name, _ in errors}
    assert {"output", "param grads", "input grad", "vjp param grads"} <= names, out
    assert all(float(err) < 1e-9 for _, err in errors), out
    assert "OK: every error < 1e-09" in out, out
