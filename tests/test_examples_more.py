"""The plain-loop and custom-models examples run end to end at tiny sizes."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from _scripts import run_script

ROOT = Path(__file__).resolve().parents[1]


def run_example(script: str, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run ``examples/<script>`` in a fresh interpreter that imports tilefn from this checkout."""
    return run_script(
        ROOT / "examples" / script, *args, timeout=timeout, python_args=["-W", "error"]
    )


def test_plain_loop_tiny():
    proc = run_example(
        "plain_loop.py",
        *("--size", "512", "--tile", "480", "--steps", "2", "--epochs", "1", "--threads", "1"),
        timeout=600,
    )
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    assert "TilePlan" in out and "4 tiles" in out, out
    losses = re.findall(r"^epoch (\d) step (\d)/2: loss (\S+) ", out, re.MULTILINE)
    assert [(e, s) for e, s, _ in losses] == [("1", "1"), ("1", "2")], out
    assert all(0 < float(loss) < 100 for _, _, loss in losses), out
    assert re.search(r"^train accuracy \d\.\d\d \(2 images\)$", out, re.MULTILINE), out


def test_custom_models_all_sections():
    proc = run_example("custom_models.py", "--threads", "1", timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, f"stdout:\n{out}\nstderr:\n{proc.stderr}"
    for key in "abcdef":
        assert re.search(rf"^\({key}\) OK in ", out, re.MULTILINE), out

    # (a) every family splits exactly, and a hand-made split streams exactly.
    table = re.findall(r"^  (\w+) +\S+M +\S+M  (True|False) ", out, re.MULTILINE)
    assert dict(table) == dict.fromkeys(
        ["resnet18", "convnext_tiny", "vgg11_bn", "densenet121", "mobilenet_v2"], "True"
    ), out
    assert "InputTypeError: split: don't know how to split a SmallNet" in out, out

    # Every streamed-vs-plain error printed, in every section, is at float64 rounding level.
    errors = re.findall(r"^    (.+?)\s+max rel\. error (\S+)", out, re.MULTILINE)
    assert len(errors) >= 14, out
    assert all(float(err) < 1e-9 for _, err in errors), out
    assert "layer_scale grads" in {name for name, _ in errors}, out

    # (b) stochastic depth is on; (c) BatchNorm on running statistics, stats untouched.
    assert "stochastic depth probabilities in the trunk: [0.0, 0.167, 0.333, 0.5]" in out, out
    assert "running statistics unchanged by the streamed forward: True" in out, out
    # (d) dense output at full resolution; (e) the refusals, with their messages.
    assert "logits (2, 3, 160, 160)" in out, out
    assert "assert_streams_like(unet, x, 96): passed" in out, out
    assert out.count("-> UnsupportedLayerError:") == 2, out
    assert "(MaxGate)" in out, out
    # (c) batch statistics on request; (f) whole-image statistics stream exactly (staged).
    assert "both on batch statistics: max rel. error" in out, out
    assert "barrier 1: GroupNorm statistics (4 groups)" in out, out


def test_lightning_resnet_tiny_and_resume(tmp_path):
    """Trainer + StreamedModule on a streamed ResNet-18; then resume from the checkpoint."""
    common = ("--size", "512", "--tile", "480", "--n-train", "2", "--n-val", "2")
    common += ("--threads", "1", "--out", str(tmp_path / "run"))
    first = run_example("lightning_resnet.py", *common, "--epochs", "1", timeout=600)
    assert first.returncode == 0, f"stdout:\n{first.stdout}\nstderr:\n{first.stderr}"
    assert re.search(r"^epochs=1 test_loss=\d+\.\d+ test_acc=", first.stdout, re.M), first.stdout
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    assert ckpt.exists()
    resumed = run_example(
        "lightning_resnet.py", *common, "--epochs", "2", "--resume", str(ckpt), timeout=600
    )
    assert resumed.returncode == 0, f"stdout:\n{resumed.stdout}\nstderr:\n{resumed.stderr}"
    assert "Restoring states from the checkpoint" in resumed.stdout + resumed.stderr
    assert re.search(r"^epochs=2 test_loss=", resumed.stdout, re.M), resumed.stdout
