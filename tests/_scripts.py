"""Run a script of this checkout (an example or a benchmark) in a fresh interpreter."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_script(
    script: Path | str,
    *args: str,
    timeout: float,
    env: Mapping[str, str] | None = None,
    python_args: Sequence[str] = (),
) -> subprocess.CompletedProcess[str]:
    """``python [python_args] script args`` from the repository root, importing tilefn from
    this checkout; output captured as text, the return code left to the caller."""
    full_env = dict(os.environ, **(env or {}))
    full_env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT), *filter(None, [full_env.get("PYTHONPATH")])]
    )
    return subprocess.run(
        [sys.executable, *python_args, str(script), *args],
        cwd=ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
