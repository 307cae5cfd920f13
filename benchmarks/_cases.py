"""The parent side of ``compare.py``: the case list, one subprocess per case, the results file.

Also the process measurements shared with the worker (RSS now, peak RSS, machine facts) and the
small record helpers (``case_key``, ``gb``, ``peak_bytes``) that the report uses too. Nothing
here imports torch at module level, so the parent process stays light.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve().with_name("compare.py")  # run with --worker for each case
RESULT_TAG = "@@compare-result@@ "

LIGHTSTREAM_NOTE = "lightstream 1.0.7 is not installed (pip install --no-deps lightstream==1.0.7)"


# --------------------------------------------------------------------------------------------
# measurements (used in the worker)
# --------------------------------------------------------------------------------------------


def current_rss() -> int:
    """Resident set size of this process now, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss() -> dict[str, int]:
    """Peak RSS in bytes: ``ru_maxrss`` (KiB on Linux) and the kernel's VmHWM of this process."""
    import resource

    out = {"ru_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    out["vmhwm_bytes"] = int(line.split()[1]) * 1024
    except OSError:
        pass
    return out


def machine_facts() -> dict[str, Any]:
    import torch

    cpu = platform.processor() or "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "host": socket.gethostname(),
        "cpu": cpu,
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
    }


# --------------------------------------------------------------------------------------------
# records
# --------------------------------------------------------------------------------------------


def case_key(rec: dict[str, Any]) -> tuple:
    return (rec["model"], rec["size"], rec.get("tile"), rec["system"], rec["mode"])


def gb(n: float | None) -> float:
    return float("nan") if n is None else n / 1e9


def peak_bytes(rec: dict[str, Any]) -> int | None:
    peak = rec.get("peak") or {}
    # VmHWM first: ru_maxrss of a subprocess starts at its parent's RSS (Linux keeps it
    # across exec), which would hide a child's smaller peak.
    return peak.get("vmhwm_bytes", peak.get("ru_maxrss_bytes"))


# --------------------------------------------------------------------------------------------
# parent: cases, subprocesses, results file
# --------------------------------------------------------------------------------------------


def csv(kind: Callable[[str], Any]) -> Callable[[str], list[Any]]:
    return lambda s: [kind(v.strip()) for v in s.split(",") if v.strip()]


def parse_tilefn_options(values: Iterable[str]) -> dict[str, dict[str, Any]]:
    """``'{...}'`` -> options of ``tilefn``; ``'LABEL={...}'`` -> options of ``tilefn:LABEL``."""
    out: dict[str, dict[str, Any]] = {}
    for value in values:
        m = re.match(r"^\s*([A-Za-z_][\w.-]*)\s*=\s*(\{.*\})\s*$", value, re.DOTALL)
        name, text = (f"tilefn:{m.group(1)}", m.group(2)) if m else ("tilefn", value)
        try:
            opts = json.loads(text)
        except json.JSONDecodeError as e:
            raise SystemExit(f"--tilefn-options {value!r}: not a JSON object ({e})") from e
        if not isinstance(opts, dict):
            raise SystemExit(f"--tilefn-options {value!r}: not a JSON object")
        out[name] = opts
    return out


def build_cases(args: argparse.Namespace) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(cases to run, records of cases skipped without running)."""
    options = parse_tilefn_options(args.tilefn_options or [])
    for system in args.systems:
        if system not in ("plain", "tilefn", "lightstream") and not system.startswith("tilefn:"):
            raise SystemExit(f"--systems: unknown system {system!r}")
        if system.startswith("tilefn:") and system not in options:
            raise SystemExit(
                f"--systems {system}: give its options with --tilefn-options '{system[7:]}={{...}}'"
            )
    have_ls = importlib.util.find_spec("lightstream") is not None
    base = {
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": args.warmup,
        "max_plain_gb": args.max_plain_gb,
    }
    if "lightstream" in args.systems:
        base["lightstream_max_tiles"] = args.lightstream_max_tiles
    cases, skipped = [], []
    for model in args.models:
        for size in args.sizes:
            for mode in args.modes:
                if "plain" in args.systems:
                    cases.append(
                        {
                            **base,
                            "model": model,
                            "size": size,
                            "tile": None,
                            "system": "plain",
                            "mode": mode,
                        }
                    )
                for tile in args.tiles:
                    if tile > size:
                        continue
                    for system in args.systems:
                        if system == "plain":
                            continue
                        case = {
                            **base,
                            "model": model,
                            "size": size,
                            "tile": tile,
                            "system": system,
                            "mode": mode,
                        }
                        if system.startswith("tilefn"):
                            case["options"] = options.get(system, {})
                        if system == "lightstream" and not have_ls:
                            skipped.append({**case, "status": "skipped", "note": LIGHTSTREAM_NOTE})
                        elif system == "lightstream" and tile < args.lightstream_min_tile:
                            note = f"skipped: tile < --lightstream-min-tile {args.lightstream_min_tile}"
                            skipped.append({**case, "status": "skipped", "note": note})
                        else:
                            cases.append(case)
    return cases, skipped


def git_commit() -> str:
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tilefn"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "?"


def run_worker(case: dict[str, Any], timeout: float) -> dict[str, Any]:
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(case["threads"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    cmd = [sys.executable, str(SCRIPT), "--worker", json.dumps(case)]
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, check=False
        )
    except subprocess.TimeoutExpired:
        return {**case, "status": "timeout", "note": f"timeout after {timeout:g} s"}
    wall = time.perf_counter() - t0
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_TAG):
            return {**case, **json.loads(line[len(RESULT_TAG) :]), "process_s": wall}
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-12:]
    return {
        **case,
        "status": "error",
        "returncode": proc.returncode,
        "note": "\n".join(tail),
        "process_s": wall,
    }


def summary(rec: dict[str, Any]) -> str:
    head = f"{rec['model']} {rec['size']}^2 tile {rec.get('tile') or '-'} {rec['system']} {rec['mode']}: "
    if rec["status"] != "ok":
        return head + (rec["note"].splitlines()[-1] if rec.get("note") else rec["status"])
    a = f", a {rec['a']:.3f}" if rec.get("a") else ""
    return (
        head
        + f"step {rec['step_s']:.2f} s, setup {rec['setup_s']:.2f} s, peak RSS {gb(peak_bytes(rec)):.2f} GB{a}"
    )


def run_all(args: argparse.Namespace) -> None:
    cases, skipped = build_cases(args)
    results = Path(args.results)
    results.parent.mkdir(parents=True, exist_ok=True)
    stamp = {
        "command": shlex.join(["python", *sys.argv]),
        "commit": git_commit(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(f"{len(cases)} cases, {len(skipped)} skipped; results -> {results}", flush=True)
    for i, case in enumerate([*skipped, *cases]):
        rec = case if case.get("status") == "skipped" else run_worker(case, args.timeout)
        rec = {**rec, **stamp}
        with results.open("a") as f:
            f.write(json.dumps(rec) + "\n")
        print(f"[{i + 1}/{len(cases) + len(skipped)}] {summary(rec)}", flush=True)
