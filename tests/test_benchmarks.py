"""benchmarks/compare.py runs end to end on a tiny model: results, agreement, table and plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "compare.py"

FIELDS = {
    "model", "size", "tile", "system", "mode", "threads", "status", "step_s", "setup_s",
    "peak", "rss_before_step_bytes", "check", "torch", "host", "cpu", "command", "commit",
}  # fmt: skip


def test_compare_tiny(tmp_path: Path):
    pytest.importorskip("matplotlib")
    results, doc, plot = tmp_path / "r.jsonl", tmp_path / "bench.md", tmp_path / "img" / "b.png"
    doc.write_text(
        "# Mine\n\nprose before\n\n<!-- results:start -->\nold\n<!-- results:end -->\n\nprose after\n"
    )
    args = ["--models", "tiny", "--sizes", "256", "--tiles", "128", "--systems", "plain,tilefn"]
    args += ["--modes", "train,infer", "--threads", "1", "--results", str(results)]
    args += ["--doc", str(doc), "--plot", str(plot)]
    proc = run_script(SCRIPT, *args, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "[4/4]" in proc.stdout, proc.stdout  # each result printed as it arrives

    recs = [json.loads(line) for line in results.read_text().splitlines()]
    assert len(recs) == 4
    assert {(r["system"], r["mode"]) for r in recs} == {
        (s, m) for s in ("plain", "tilefn") for m in ("train", "infer")
    }
    for r in recs:
        assert r["status"] == "ok", r
        assert FIELDS <= r.keys(), FIELDS - r.keys()
        assert r["threads"] == 1 and r["step_s"] > 0
        assert r["peak"]["ru_maxrss_bytes"] >= r["rss_before_step_bytes"] > 0
    by = {(r["system"], r["mode"]): r for r in recs}
    for mode in ("train", "infer"):
        tf = by["tilefn", mode]
        assert tf["tile"] == 128 and tf["a"] > 1 and tf["n_tiles"] > 1 and tf["memory_estimate"] > 0
        plain, streamed = by["plain", mode]["check"], tf["check"]
        keys = ["loss", "out_dot", "out_abs"]
        keys += (
            ["grad0_abs", "grad0_dot", "grad_conv_abs", "grad_all_abs"] if mode == "train" else []
        )
        for key in keys:
            # random projections (`*_dot`) cancel: compare them against the sum of |terms|
            tol = 1e-4 * max(abs(plain[key]), plain.get(f"{key}_scale", 0.0))
            assert abs(streamed[key] - plain[key]) <= tol, (key, streamed[key], plain[key])

    text = doc.read_text()
    assert text.startswith("# Mine\n\nprose before\n") and text.rstrip().endswith("prose after")
    assert "old" not in text
    table = [line for line in text.splitlines() if line.startswith("| tiny | 256² | 128 |")]
    assert len(table) == 2, text
    assert "tilefn/limit" in text and "img/b.png" in text
    assert plot.stat().st_size > 1000

    # --report re-renders from the file alone
    doc.unlink()
    proc = run_script(
        SCRIPT, "--report", "--results", str(results), "--doc", str(doc), "--plot", "",
        timeout=120, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "<!-- results:start -->" in doc.read_text() and "| tiny | 256² | 128 |" in doc.read_text()
    )
