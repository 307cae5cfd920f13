"""The main job (examples/train_slides.py) and the saliency example, run tiny; and the property
the main job's data set claims: its classes differ at full resolution and vanish at 1/16."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _scripts import run_script

import tilefn
import tilefn.slides
import tilefn.testing

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
sys.path.insert(0, str(EXAMPLES))
import train_slides  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def run_example(script: str, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    proc = run_script(EXAMPLES / script, *args, "--threads", "1", timeout=timeout)
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return proc


# --------------------------------------------------------------------------------------
# The scripts, tiny
# --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """train_slides.py at 512 px (with the downsampled baseline), once for this module."""
    pytest.importorskip("lightning")
    pytest.importorskip("torchmetrics")
    pytest.importorskip("tifffile")
    data = tmp_path_factory.mktemp("slides")
    args = ("--size", "512", "--tile", "256", "--n-train", "4", "--n-val", "4", "--epochs", "1")
    proc = run_example("train_slides.py", *args, "--data-dir", str(data), "--downsample-baseline")
    return data, args, proc.stdout


def test_train_slides_tiny(tiny_run):
    import tifffile

    data, _, out = tiny_run
    assert "generated 8 slides of 512x512 px" in out, out
    assert "TilePlan" in out, out
    assert re.search(r"epoch 1/1: train_loss \d+\.\d+ .*val_loss \d+\.\d+  val_acc \d\.\d+", out), (
        out
    )
    assert re.search(r"^BASELINE 32x32 px \(downsampled 16x\): val_acc=\d\.\d+", out, re.M), out
    assert re.search(r"^time: \d+ s in all", out, re.M), out
    assert re.search(r"^FINAL val_acc=\d\.\d{3} \(chance 0\.50\) on 4 slides of 512 px$", out, re.M)

    slides = sorted(data.glob("*.tif"))
    assert [p.name for p in slides] == [
        f"{split}_{i:04d}_class{i % 2}.tif" for split in ("train", "val") for i in range(4)
    ]
    with tifffile.TiffFile(slides[0]) as tif:
        page = tif.pages[0]
        assert page.is_tiled and page.shape == (512, 512) and page.dtype == np.uint8
    assert (data / "model.pt").exists()


def test_train_slides_reuses_data(tiny_run):
    data, args, _ = tiny_run
    before = {p: p.stat().st_mtime_ns for p in data.glob("*.tif")}
    out = run_example("train_slides.py", *args, "--data-dir", str(data)).stdout
    assert "reusing 8 slides of 512x512 px" in out, out
    assert {p: p.stat().st_mtime_ns for p in data.glob("*.tif")} == before


def test_train_slides_min_acc_fails_loudly(tiny_run):
    data, args, _ = tiny_run
    proc = run_script(
        EXAMPLES / "train_slides.py",
        *args,
        *("--data-dir", str(data), "--min-acc", "1.01", "--threads", "1"),
        timeout=300,
    )
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "FAILED: val_acc" in proc.stderr


def _check_png(path: Path, out: str) -> None:
    from PIL import Image

    assert f"wrote {path} (1400x700 px)" in out, out
    with Image.open(path) as im:
        im.verify()
    with Image.open(path) as im:
        assert im.format == "PNG" and im.size == (1400, 700) and im.mode in ("RGB", "RGBA")
        assert np.asarray(im).std() > 0


def test_saliency_trains_itself(tmp_path):
    pytest.importorskip("PIL")
    png = tmp_path / "sal.png"
    args = ("--size", "256", "--tile", "128", "--n-train", "4", "--steps", "4", "--out", str(png))
    out = run_example("saliency.py", *args).stdout
    assert re.search(r"^step 4/4: loss \d+\.\d+", out, re.M), out
    assert re.search(r"p\(class 1\) = \d\.\d{3}; saliency from \d+ tiles of 128 px", out), out
    assert re.search(r"^the 100 most salient pixels: \d+ on cells, which cover", out, re.M), out
    assert re.search(r"^the 8 most salient spots \(enlarged in the PNG\) lie on: \w+", out, re.M)
    _check_png(png, out)


def test_saliency_from_checkpoint(tiny_run, tmp_path):
    pytest.importorskip("PIL")
    data, _, _ = tiny_run
    png = tmp_path / "sal.png"
    args = ("--size", "256", "--tile", "128", "--checkpoint", str(data / "model.pt"))
    out = run_example("saliency.py", *args, "--out", str(png)).stdout
    assert f"loaded the model trained on 512 px slides from {data / 'model.pt'}" in out, out
    assert "step " not in out, out
    _check_png(png, out)


# --------------------------------------------------------------------------------------
# The data set: deterministic; classes differ at full resolution, not after downsampling
# --------------------------------------------------------------------------------------


def test_make_slide_is_deterministic():
    a, marks_a = train_slides.make_slide(256, 1, seed=7)
    b, marks_b = train_slides.make_slide(256, 1, seed=7)
    c, _ = train_slides.make_slide(256, 1, seed=8)
    assert a.dtype == np.uint8 and a.shape == (256, 256)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(marks_a, marks_b)
    assert (a != c).mean() > 0.5
    assert train_slides.slide_seed(0, "train", 3) == train_slides.slide_seed(0, "train", 3)
    assert train_slides.slide_seed(0, "train", 3) != train_slides.slide_seed(0, "val", 3)


def test_glyphs_have_equal_mass():
    sizes = {name: len(set(g)) for name, g in train_slides.GLYPHS.items()}
    assert sizes == {"square": 9, "cross": 9, "plus": 9}
    assert all(max(abs(dy), abs(dx)) <= 2 for g in train_slides.GLYPHS.values() for dy, dx in g)


def shape_score(image: np.ndarray) -> int:
    """Pixels where a plus-shaped matched filter beats a cross-shaped one by over 400 grey
    levels (a plus of brightness 45-75 scores 8 x 45-75 there): a simple full-resolution count
    of pluses that needs neither labels nor cell positions."""
    kernels = torch.zeros(2, 1, 5, 5)
    for k, name in enumerate(("plus", "cross")):
        for dy, dx in train_slides.GLYPHS[name]:
            kernels[k, 0, dy + 2, dx + 2] = 1.0
    x = torch.from_numpy(image).float()[None, None]
    r = F.conv2d(x, kernels)
    return int((r[0, 0] - r[0, 1] > 400).sum())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classes_vanish_when_downsampled_16x(seed):
    size = 1024
    neg, marks = train_slides.make_slide(size, 0, seed)
    pos, marks_pos = train_slides.make_slide(size, 1, seed)
    # The pair differs only in the shape of the class cells (crosses -> pluses) ...
    np.testing.assert_array_equal(marks[:, :2], marks_pos[:, :2])
    changed = marks[:, 2] != marks_pos[:, 2]
    assert changed.sum() >= len(marks) // 2
    assert set(marks[changed, 2]) == {1} and set(marks_pos[changed, 2]) == {2}
    # ... which shows at full resolution: cells are 45-75 grey levels above the background ...
    diff = np.abs(pos.astype(int) - neg.astype(int))
    assert diff.max() >= 40 and (diff >= 30).sum() >= 8 * changed.sum()
    # (most of the changed cells, now pluses, are seen by a plus-shaped matched filter)
    assert shape_score(neg) <= 2 and shape_score(pos) >= max(20, changed.sum() // 2)
    # ... and vanishes at 1/16 (4096 px -> 256 px): every 16 x 16 block has the same mean
    # within 2 grey levels, while the blocks themselves vary by tens of grey levels.
    small_neg = train_slides.downsample(neg, 16)
    small_pos = train_slides.downsample(pos, 16)
    assert small_neg.shape == (size // 16, size // 16)
    assert np.abs(small_pos - small_neg).max() < 2.0
    assert np.abs(small_pos - small_neg).mean() < 0.1
    assert small_neg.std() > 10


def test_class_statistics_match_when_downsampled():
    """Across unpaired slides too: the downsampled classes have the same grey-level statistics,
    while the full-resolution shape statistic separates them perfectly."""
    stats = {0: [], 1: []}
    scores = {0: [], 1: []}
    for i in range(8):
        label = i % 2
        image, _ = train_slides.make_slide(512, label, 100 + i)
        small = train_slides.downsample(image, 16)
        stats[label].append([small.mean(), small.std(), np.percentile(small, 99)])
        scores[label].append(shape_score(image))
    assert max(scores[0]) <= 2 and min(scores[1]) >= 10, scores
    m0, m1 = np.mean(stats[0], 0), np.mean(stats[1], 0)
    spread = np.std(stats[0] + stats[1], 0)
    assert np.all(np.abs(m0 - m1) < 2 * spread + 1e-9), (m0, m1, spread)


def test_dataset_reads_uint8_lazily(tmp_path):
    pytest.importorskip("tifffile")
    splits = train_slides.generate_dataset(tmp_path, 128, n_train=2, n_val=2, seed=0)
    assert [label for _, label in splits["train"]] == [0, 1]
    ds = train_slides.SlideDataset(splits["train"], augment=True)
    x, label = ds[1]
    # A lazy, masked image: read crop by crop, glass set to 255 outside the tissue mask.
    assert isinstance(x, tilefn.slides.MaskedImage) and label == 1
    assert x.dtype == torch.uint8 and tuple(x.shape) == (1, 1, 128, 128)
    image, _ = train_slides.make_slide(128, 1, train_slides.slide_seed(0, "train", 1))
    plain, _ = train_slides.SlideDataset(splits["train"])[1]
    read = plain.read([(0, 128), (0, 128)])[0, 0].numpy()
    tissue = np.repeat(np.repeat(plain.mask.mask, 32, 0), 32, 1)[:128, :128]
    assert 0 < tissue.mean() < 1
    np.testing.assert_array_equal(read[tissue], image[tissue])
    assert (read[~tissue] == 255).all()
    small, _ = train_slides.SlideDataset(splits["train"], downsample=16)[0]
    assert small.shape == (1, 8, 8) and small.dtype == torch.uint8


def test_running_standardize():
    layer = train_slides.RunningStandardize(3, momentum=0.1)
    xs = torch.randn(10, 3) * torch.tensor([1.0, 5.0, 0.1]) + torch.tensor([0.0, 3.0, -2.0])
    layer.train()
    for x in xs:
        layer(x[None])
    # First 1/momentum updates: exact cumulative mean and (population) variance.
    torch.testing.assert_close(layer.running_mean, xs.mean(0))
    torch.testing.assert_close(layer.running_var, xs.var(0, unbiased=False))
    layer.eval()
    y = layer(xs)
    torch.testing.assert_close(y.mean(0), torch.zeros(3), atol=1e-5, rtol=0)
    before = layer.running_mean.clone()
    layer(xs)
    torch.testing.assert_close(layer.running_mean, before)  # eval: no update


def test_trunk_streams_exactly():
    trunk, _ = train_slides.build_model(0)
    x = torch.randn(1, 1, 256, 256, dtype=torch.float64)
    tilefn.testing.assert_streams_like(trunk.double(), x, 128, saliency=True)


def _terminate_after(marker: str, *cmd: str, timeout: float = 180) -> tuple[int, str, str]:
    """Start ``python cmd...``, send SIGTERM once ``marker`` appears on its stdout (plus a
    moment, so that training is under way), and return ``(status, stdout, stderr)``."""
    import os
    import signal
    import threading
    import time

    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.Popen(
        [sys.executable, *cmd], cwd=ROOT, env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    lines: list[str] = []
    errors: list[str] = []
    readers = [
        threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True),
        threading.Thread(target=lambda: errors.extend(proc.stderr), daemon=True),
    ]
    for t in readers:
        t.start()
    deadline = time.monotonic() + timeout
    while not any(marker in line for line in lines):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
            raise AssertionError(f"{marker!r} never appeared:\n{''.join(lines)}{''.join(errors)}")
        time.sleep(0.2)
    time.sleep(3)
    proc.send_signal(signal.SIGTERM)
    status = proc.wait(timeout=120)
    for t in readers:
        t.join(timeout=10)
    proc.stdout.close()
    proc.stderr.close()
    return status, "".join(lines), "".join(errors)


def test_a_terminated_main_job_fails_loudly(tmp_path):
    """A SIGTERM (preemption, time limit) during training: non-zero status, a message, no
    FINAL line and no saved model (Lightning alone would exit 0 in silence)."""
    pytest.importorskip("lightning")
    pytest.importorskip("tifffile")
    data = tmp_path / "data"
    status, out, err = _terminate_after(
        "TilePlan", str(EXAMPLES / "train_slides.py"), "--size", "512", "--n-train", "6",
        "--n-val", "2", "--epochs", "200", "--tile", "128", "--data-dir", str(data),
        "--no-downsample-baseline", "--threads", "1",
    )  # fmt: skip
    assert status == 143, (status, out[-2000:], err[-2000:])
    assert "INTERRUPTED: trainer.fit received SIGTERM at epoch" in err, err[-2000:]
    assert "FINAL" not in out and not (data / "model.pt").exists()


def test_a_terminated_lightning_example_fails_loudly(tmp_path):
    pytest.importorskip("lightning")
    status, out, err = _terminate_after(
        "TilePlan", str(EXAMPLES / "lightning_resnet.py"), "--size", "96", "--tile", "96",
        "--n-train", "4", "--n-val", "2", "--epochs", "200", "--out", str(tmp_path / "run"),
        "--threads", "1",
    )  # fmt: skip
    assert status == 143, (status, out[-2000:], err[-2000:])
    assert "INTERRUPTED: trainer.fit received SIGTERM" in err and "test_acc" not in out
