"""benchmarks/compare.py end to end on a tiny model (results, agreement, table, plot), its
--no-doc / --no-plot flags and its errors for empty paths."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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
    assert "tilefn/limit" in text and "](img/b.png)" in text
    assert plot.stat().st_size > 1000

    # --report re-renders from the file alone
    doc.unlink()
    plot_bytes = plot.read_bytes()
    proc = run_script(
        SCRIPT, "--report", "--results", str(results), "--doc", str(doc), "--no-plot",
        timeout=120, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert (
        "<!-- results:start -->" in doc.read_text() and "| tiny | 256² | 128 |" in doc.read_text()
    )
    assert "](img/b.png)" not in doc.read_text()  # no plot, no link to one
    assert plot.read_bytes() == plot_bytes and "plot ->" not in proc.stdout


def test_compare_no_doc_no_plot(tmp_path: Path):
    """``--no-doc --no-plot`` writes the results and nothing else; run from another folder, the
    script still finds its sibling modules, in the parent and in the worker."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    args = ["--models", "tiny", "--sizes", "128", "--tiles", "64", "--systems", "plain,tilefn"]
    args += ["--modes", "infer", "--threads", "1", "--results", "r.jsonl", "--no-doc", "--no-plot"]
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    recs = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [(r["system"], r["status"]) for r in recs] == [("plain", "ok"), ("tilefn", "ok")], recs
    assert "| tiny | 128² | 64 |" in proc.stdout  # the table is still printed
    assert "table ->" not in proc.stdout and "plot ->" not in proc.stdout
    # the defaults (docs/benchmarks.md, docs/img/benchmarks.png) are relative to the cwd
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.jsonl"]


@pytest.mark.parametrize(
    "flag, value, hint",
    [
        ("--doc", "", "--no-doc"),
        ("--plot", "", "--no-plot"),
        ("--results", "", None),
        ("--doc", "''", "--no-doc"),  # a doubly quoted '' arrives as two quote characters
        ("--plot", " ", "--no-plot"),
    ],
)
def test_compare_empty_path_is_an_error(tmp_path: Path, flag: str, value: str, hint: str | None):
    results = tmp_path / "r.jsonl"
    results.write_text("")
    args = ["--report", "--results", str(results), "--doc", str(tmp_path / "d.md")]
    args += ["--plot", str(tmp_path / "p.png"), flag, value]
    proc = run_script(SCRIPT, *args, timeout=60)
    assert proc.returncode == 2, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert f"argument {flag}: empty path" in proc.stderr, proc.stderr
    if hint:
        assert hint in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == [results] and proc.stdout == ""


def test_compare_help_and_exclusive_flags():
    proc = run_script(SCRIPT, "--help", timeout=60, env={"COLUMNS": "200"})
    assert proc.returncode == 0, proc.stderr
    for text in ("--doc DOC | --no-doc", "--plot PLOT | --no-plot", "write no plot"):
        assert text in proc.stdout, proc.stdout
    proc = run_script(SCRIPT, "--report", "--doc", "x.md", "--no-doc", timeout=60)
    assert proc.returncode == 2 and "not allowed with argument" in proc.stderr, proc.stderr


def test_background_benchmark_tiny(tmp_path: Path):
    """benchmarks/background.py end to end: paired slides, skipping counted, table written."""
    pytest.importorskip("matplotlib")
    results, doc, plot = tmp_path / "bg.json", tmp_path / "bench.md", tmp_path / "bg.png"
    doc.write_text("# Mine\n\n<!-- background:start -->\nold\n<!-- background:end -->\n")
    script = ROOT / "benchmarks" / "background.py"
    args = ["--size", "384", "--tile", "128", "--tissue", "0.3", "--modes", "train"]
    args += ["--repeats", "1", "--threads", "1", "--results", str(results)]
    args += ["--doc", str(doc), "--plot", str(plot)]
    proc = run_script(script, *args, timeout=300, env={"OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    recs = {r["system"]: r for r in json.loads(results.read_text())["records"]}
    assert {"tilefn", "tilefn-noskip", "plain"} <= set(recs)
    assert all(r["status"] == "ok" and r["paired_step_s"] > 0 for r in recs.values())
    skip, noskip = recs["tilefn"]["stats"]["backward"], recs["tilefn-noskip"]["stats"]["backward"]
    assert skip["computed"] < skip["crops"] == noskip["computed"] == noskip["crops"]
    assert 0 < recs["tilefn"]["constant_fraction"] < 1
    text = doc.read_text()
    assert "old" not in text and "| 30 % | train | tilefn |" in text and plot.exists()


def test_prefetch_benchmark_tiny():
    pytest.importorskip("tifffile")
    script = ROOT / "benchmarks" / "prefetch.py"
    proc = run_script(
        script, "--size", "512", "--tile", "256", "--repeats", "1", "--threads", "1",
        timeout=300, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "| forward |" in proc.stdout and "| train step |" in proc.stdout, proc.stdout


def test_stage_cuts_benchmark_tiny():
    """benchmarks/stage_cuts.py end to end on a small image: every configuration runs in its
    own process and gives the same gradient."""
    script = ROOT / "benchmarks" / "stage_cuts.py"
    proc = run_script(
        script, "--size", "512", "--tile", "512", "--threads", "1",
        timeout=600, env={"OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "tilefn, cuts, budget" in proc.stdout and "x plain" in proc.stdout, proc.stdout
    norms = [float(v) for v in re.findall(r"'grad_norm': ([0-9.e+-]+)", proc.stdout)]
    assert len(norms) == 6 and max(norms) - min(norms) < 1e-3 * max(norms), proc.stdout
    assert re.search(r"tilefn, cuts, on disk \{.*'on_disk': True", proc.stdout), proc.stdout
