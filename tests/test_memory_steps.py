"""Resident memory does not grow over 100 streamed training steps (with and without kept
crop graphs). Runs benchmarks/memory_steps.py in a subprocess at a small size."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _scripts import run_script

SCRIPT = Path(__file__).resolve().parent.parent / "benchmarks" / "memory_steps.py"


@pytest.mark.skipif(not Path("/proc/self/statm").exists(), reason="needs /proc (Linux)")
@pytest.mark.parametrize("budget", [None, "1e9"])
def test_rss_is_flat_over_100_steps(tmp_path: Path, budget: str | None) -> None:
    out = tmp_path / "samples.json"
    cmd = [str(SCRIPT), "--model", "tiny", "--size", "256", "--tile", "96"]
    cmd += ["--steps", "100", "--threads", "1", "--json", str(out), "--tolerance-mb", "24"]
    if budget is not None:
        cmd += ["--budget", budget]
    proc = run_script(*cmd, timeout=600, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    data = json.loads(out.read_text())
    assert len(data["rss_mib"]) == 100
    assert data["summary"]["growth_mib"] <= 24
    # the loss went down: the steps really trained
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step")]
    first, last = (float(line.split("loss")[1]) for line in (lines[0], lines[-1]))
    assert last < first
