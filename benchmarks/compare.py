"""Side-by-side benchmark: the plain model, tilefn and lightstream, each case in its own process.

Every case (one model, image side, tile size, system and mode) runs in a fresh subprocess of
this script (``--worker``), so peak RSS is per case and nothing leaks from one case into the
next. A case builds the network (``weights=None``, fixed seed), a random float32 image of shape
(1, 3, S, S) with a fixed seed, a head (global average pool + ``Linear(C, 2)``) and a
cross-entropy loss on a fixed label, then times

* ``train``: trunk forward + head + loss + backward (parameter grads of trunk and head);
* ``infer``: trunk forward under ``torch.no_grad()``.

Setup (tilefn's planning, lightstream's statistics pass) is untimed for the step and recorded
separately as ``setup_s``; the step time is the minimum over ``--repeats``. Each finished case
is appended as one JSON line to ``--results`` (an interrupted run keeps what it finished) and
printed; at the end the table in ``--doc`` (between the ``results`` markers) and the plot
``--plot`` are re-rendered from the whole results file.

Systems: ``plain`` (the model itself; skipped with a note when its estimated memory exceeds
``--max-plain-gb``), ``tilefn`` (``tilefn.streamify(trunk, tile, **options)``), ``tilefn:LABEL``
(a second tilefn configuration, options from ``--tilefn-options 'LABEL={...}'``) and
``lightstream`` (version 1.0.7, built on CPU around the same trunk; see ``build_lightstream``).

    python benchmarks/compare.py --models resnet18 --sizes 2048 --tiles 1024 --threads 1 \\
        --results benchmarks/results/resnet18.jsonl
    python benchmarks/compare.py --report --results benchmarks/results/resnet18.jsonl
    python benchmarks/compare.py --systems plain,tilefn,tilefn:budget \\
        --tilefn-options 'budget={"memory_budget": 8000000000}'

Not part of the test run (tests/test_benchmarks.py runs it once on a tiny model).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULT_TAG = "@@compare-result@@ "
MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"
SYSTEM_ORDER = ("plain", "tilefn", "lightstream")
MODEL_NAMES = ("tiny", "resnet18", "resnet34", "resnet50")
SEED = 0
LABEL = 1  # the fixed class label of the loss

# Peak-memory model for the plain network: estimated peak = factor x `activation_bytes` (all
# layer outputs on the whole image). The factors are the largest ratio (peak RSS - RSS before
# the step) / activation_bytes measured with this script, rounded up (1 thread, float32, CPU):
#
#     ratio (train / infer)   1024^2        2048^2
#     tiny                    1.69 / 0.60   1.65 / 0.60
#     resnet18                1.91 / 0.31   1.25 / 0.31
#     resnet50                1.12 / 0.17   0.98 / 0.12
#
# The ratio falls with the image size (fixed costs such as weight gradients matter less), and
# only large images come near --max-plain-gb, so the factors follow the 2048^2 column. The
# estimate adds the RSS before the step (Python, PyTorch, the image).
PLAIN_MEMORY_FACTOR = {"train": 1.3, "infer": 0.35}

LIGHTSTREAM_NOTE = "lightstream 1.0.7 is not installed (pip install --no-deps lightstream==1.0.7)"


# --------------------------------------------------------------------------------------------
# worker: one case in this process
# --------------------------------------------------------------------------------------------


def build_trunk(name: str):
    """The streamed trunk: a fully local network, in eval mode (BatchNorm uses running stats)."""
    import torch
    from torch import nn

    torch.manual_seed(SEED)
    if name == "tiny":
        # A few convolutions, strides, a max pool and BatchNorm: runs in well under a second.
        return nn.Sequential(
            nn.Conv2d(3, 8, 3, stride=2, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(3, stride=2, padding=1),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.Conv2d(16, 16, 3, stride=2, padding=1),
            nn.ReLU(),
        ).eval()
    import torchvision

    if not hasattr(torchvision.models, name):
        raise SystemExit(f"unknown model {name!r}; use tiny or a torchvision model name")
    net = getattr(torchvision.models, name)(weights=None)
    return nn.Sequential(*list(net.children())[:-2]).eval()


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


def lightstream_tile_counts(scnn, size: int) -> dict[str, Any]:
    """lightstream's forward and backward tile counts for an S x S image (its own formulas)."""
    tile = scnn.tile_shape[-1]
    stride = int(scnn.output_stride[-1])
    out_tile = scnn._tile_output_shape[-1]
    lost, glost = scnn.tile_output_lost, scnn.tile_gradient_lost
    if size <= tile:
        fwd = bwd = 1
    else:
        out_size = (size - tile) // stride + out_tile
        fwd = math.ceil(out_size / (out_tile - lost.top - lost.bottom))
        valid = (tile - glost.top - glost.bottom) // stride * stride
        bwd = math.ceil((size - glost.top - glost.bottom) / valid)
    return {
        "ls_forward_tiles": fwd * fwd,
        "ls_backward_tiles": bwd * bwd,
        "ls_forward_a": fwd * fwd * tile * tile / size**2,
        "ls_backward_a": bwd * bwd * tile * tile / size**2,
        "ls_output_lost": [lost.top, lost.left, lost.bottom, lost.right],
        "ls_gradient_lost": [glost.top, glost.left, glost.bottom, glost.right],
    }


def build_lightstream(trunk, tile: int):
    """lightstream's StreamingCNN around ``trunk``, entirely on the CPU.

    lightstream 1.0.7 cannot compute its statistics on a CPU-only machine as shipped:
    ``StreamingConstructor(statistics_on_cpu=False)`` moves the model to CUDA in ``__init__``,
    and ``statistics_on_cpu=True`` makes ``StreamingCNN._configure`` call ``.cuda()`` after the
    statistics pass (core/scnn/scnn.py, about line 134). Its ResNet wrappers (StreamingResNet)
    also download ImageNet weights. So we use the lower-level StreamingConstructor directly with
    our ``weights=None`` trunk, constructed with ``statistics_on_cpu=True`` (no move to CUDA in
    ``__init__``), and override only ``create_streaming_model`` to hand StreamingCNN
    ``statistics_on_cpu=False``: it then works on the device of the parameters, the CPU. The
    other options match StreamingResNet's, except no normalisation inside (our image is already
    float32) and no copy to a GPU. BatchNorm2d is kept during the statistics pass, as in
    StreamingResNet. Nothing else is patched.
    """
    import torch
    from lightstream.core.constructor import StreamingConstructor
    from lightstream.core.scnn.scnn import StreamingCNN

    class CPUConstructor(StreamingConstructor):
        def create_streaming_model(self):
            return StreamingCNN(
                self.model,
                tile_shape=(1, 3, self.tile_size, self.tile_size),
                deterministic=self.deterministic,
                saliency=self.saliency,
                copy_to_gpu=False,
                verbose=self.verbose,
                statistics_on_cpu=False,  # work on the parameters' device (CPU), never .cuda()
                normalize_on_gpu=False,
                mean=self.mean,
                std=self.std,
                state_dict=self.tile_cache,
            )

    constructor = CPUConstructor(
        trunk,
        tile,
        verbose=False,
        deterministic=False,
        saliency=False,
        copy_to_gpu=False,
        statistics_on_cpu=True,
        normalize_on_gpu=False,
        add_keep_modules=[torch.nn.BatchNorm2d],
    )
    return constructor.prepare_streaming_model()


def activation_bytes(trunk, size: int, probe: int = 128) -> float:
    """Bytes of all layer outputs of ``trunk`` on a (1, 3, size, size) float32 image.

    Measured with forward hooks on a ``probe``-pixel image and scaled by the area; outputs that
    share storage (in-place activations) count once. Cheaper than ``tilefn.plan`` for one case
    (no meta-device warm-up), and close to its ``crop_activation_bytes`` with ``tile_size=size``.
    """
    import torch

    outputs: list = []  # kept alive, so that no storage is freed and its address reused

    def hook(_module, _inputs, output):
        if isinstance(output, torch.Tensor):
            outputs.append(output)

    leaves = [m for m in trunk.modules() if not list(m.children())]
    handles = [m.register_forward_hook(hook) for m in leaves]
    try:
        with torch.no_grad():
            trunk(torch.zeros(1, 3, probe, probe))
    finally:
        for h in handles:
            h.remove()
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in outputs}
    return sum(storages.values()) * (size / probe) ** 2


def projection(shape: Sequence[int], seed: int):
    """A fixed standard-normal tensor of ``shape`` (for checksums that see every element)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return torch.randn(tuple(shape), generator=g, dtype=torch.float32)


def checksums(out, loss, params: list[tuple[str, Any]], head) -> dict[str, float]:
    """Scalars that plain, tilefn and lightstream should agree on."""
    import torch

    sums: dict[str, float] = {"loss": float(loss.detach())}
    out = out.detach()
    # A random projection of the trunk output, one channel at a time to keep memory flat.
    g = torch.Generator().manual_seed(SEED + 1)
    dot = scale = 0.0
    for c in range(out.shape[1]):
        prod = out[:, c].double() * torch.randn(out[:, c].shape, generator=g).double()
        dot, scale = dot + float(prod.sum()), scale + float(prod.abs().sum())
    # A projection's sum cancels; its differences are measured against sum |terms| (`_scale`).
    sums["out_dot"], sums["out_dot_scale"] = dot, scale
    sums["out_abs"] = float(out.double().abs().sum())
    grads = [(n, p.grad) for n, p in params if p.grad is not None]
    if grads:
        first = next(g_ for n, g_ in grads if g_.dim() == 4)
        sums["grad0_abs"] = float(first.double().abs().sum())
        prod = first.double() * projection(first.shape, SEED + 2).double()
        sums["grad0_dot"], sums["grad0_dot_scale"] = float(prod.sum()), float(prod.abs().sum())
        sums["grad_conv_abs"] = float(
            sum(g_.double().abs().sum() for _, g_ in grads if g_.dim() == 4)
        )
        sums["grad_all_abs"] = float(sum(g_.double().abs().sum() for _, g_ in grads))
        sums["n_param_grads"] = len(grads)
        sums["head_grad_abs"] = float(sum(p.grad.double().abs().sum() for p in head.parameters()))
    return sums


def run_case(case: dict[str, Any]) -> dict[str, Any]:
    """Run one case in this process and return its result record."""
    import torch
    from torch import nn

    torch.set_num_threads(case["threads"])
    import tilefn

    system, mode, size, tile = case["system"], case["mode"], case["size"], case["tile"]
    rec: dict[str, Any] = {**machine_facts()}
    trunk = build_trunk(case["model"])
    shape = (1, 3, size, size)

    if system == "plain":
        rec["activation_bytes"] = activation_bytes(trunk, size)
        est = (
            current_rss()
            + 4 * size * size * 3
            + PLAIN_MEMORY_FACTOR[mode] * rec["activation_bytes"]
        )
        rec["plain_estimate_bytes"] = est
        if est > case["max_plain_gb"] * 1e9:
            rec["status"] = "skipped"
            rec["short"] = f"skipped (est. {est / 1e9:.1f} GB)"
            rec["note"] = (
                f"skipped: estimated {est / 1e9:.1f} GB > --max-plain-gb {case['max_plain_gb']:g}"
            )
            return rec

    x = torch.randn(shape, generator=torch.Generator().manual_seed(SEED))
    target = torch.tensor([LABEL])
    with torch.no_grad():
        channels = trunk(torch.zeros(1, 3, 64, 64)).shape[1]
    torch.manual_seed(SEED + 3)
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(channels, 2))

    t0 = time.perf_counter()
    if system == "plain":
        forward, params = trunk, list(trunk.named_parameters())
    elif system.startswith("tilefn"):
        backbone, _ = tilefn.streamify(trunk, tile, **case.get("options", {}))
        p = backbone.plan(shape)  # plans are cached: the step reuses this one
        rec.update(
            a=p.overlap,
            n_tiles=p.n_tiles,
            memory_estimate=p.memory_estimate,
            crop_activation_bytes=p.crop_activation_bytes,
        )
        forward, params = backbone, list(trunk.named_parameters())
    elif system == "lightstream":
        scnn = build_lightstream(trunk, tile)
        rec.update(lightstream_tile_counts(scnn, size))
        limit = case.get("lightstream_max_tiles") or 0
        if mode == "train" and limit and rec["ls_backward_tiles"] > limit:
            n, lost = rec["ls_backward_tiles"], rec["ls_gradient_lost"]
            rec["status"] = "skipped"
            rec["short"] = f"skipped ({n} bwd tiles)"
            rec["note"] = (
                f"skipped: lightstream's backward would run {n} tiles of {tile}² "
                f"(it discards {lost[0]} px of gradient per side), over --lightstream-max-tiles {limit}"
            )
            rec["setup_s"] = time.perf_counter() - t0
            return rec
        forward, params = scnn, list(scnn.stream_module.named_parameters())
    else:
        raise SystemExit(f"unknown system {system!r}")
    rec["setup_s"] = time.perf_counter() - t0
    if system != "plain" and not system.startswith("tilefn"):
        rec["a"] = tilefn.plan(trunk, shape, tile_size=tile).overlap  # tilefn's a, for reference

    def step():
        for _, q in params:
            q.grad = None
        for q in head.parameters():
            q.grad = None
        if mode == "infer":
            with torch.no_grad():
                out = forward(x)
            return out, None
        if system == "lightstream":
            # lightstream's forward runs without a graph; its backward takes the gradient of the
            # loss with respect to the trunk output and recomputes the tiles.
            out = forward(x).requires_grad_(True)
            loss = nn.functional.cross_entropy(head(out), target)
            loss.backward()
            forward.backward(x, out.grad)
        else:
            out = forward(x)
            loss = nn.functional.cross_entropy(head(out), target)
            loss.backward()
        return out, loss

    for _ in range(case.get("warmup", 0)):  # untimed: allocator and caches as in a loop
        step()
    rec["rss_before_step_bytes"] = current_rss()
    rec["peak_before_step"] = peak_rss()
    times = []
    for _ in range(case["repeats"]):
        t0 = time.perf_counter()
        out, loss = step()
        times.append(time.perf_counter() - t0)
    rec["peak"] = peak_rss()  # before the checksums, which allocate a little
    rec["step_s"] = min(times)
    rec["step_all_s"] = times
    if loss is None:
        with torch.no_grad():
            loss = nn.functional.cross_entropy(head(out), target)
    rec["check"] = checksums(out, loss, params, head)
    rec["out_shape"] = list(out.shape)
    rec["status"] = "ok"
    return rec


def worker_main(case_json: str) -> None:
    case = json.loads(case_json)
    rec = run_case(case)
    sys.stdout.flush()
    print(RESULT_TAG + json.dumps(rec), flush=True)


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


def case_key(rec: dict[str, Any]) -> tuple:
    return (rec["model"], rec["size"], rec.get("tile"), rec["system"], rec["mode"])


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
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(case)]
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


# --------------------------------------------------------------------------------------------
# report: markdown table and plot
# --------------------------------------------------------------------------------------------


def gb(n: float | None) -> float:
    return float("nan") if n is None else n / 1e9


def peak_bytes(rec: dict[str, Any]) -> int | None:
    peak = rec.get("peak") or {}
    return peak.get("ru_maxrss_bytes", peak.get("vmhwm_bytes"))


def load_results(path: Path) -> list[dict[str, Any]]:
    """The newest record per case (a rerun of a case replaces the older line)."""
    latest: dict[tuple, dict[str, Any]] = {}
    for line in path.read_text().splitlines():
        if line.strip():
            rec = json.loads(line)
            latest[case_key(rec)] = rec
    return list(latest.values())


def system_sort(system: str) -> tuple[int, str]:
    base = system.split(":")[0]
    return (SYSTEM_ORDER.index(base) if base in SYSTEM_ORDER else 9, system)


def model_sort(model: str) -> tuple[int, str]:
    return (MODEL_NAMES.index(model) if model in MODEL_NAMES else 99, model)


def rel_diff(a: float, b: float, scale: float = 0.0) -> float:
    """``|a - b| / max(|b|, scale)``: relative to ``b``, or to ``scale`` if that is larger."""
    return abs(a - b) / max(abs(b), scale, 1e-30)


def agreement(rec: dict[str, Any] | None, plain: dict[str, Any] | None) -> str:
    """Largest relative difference of the checksums shared with the plain run of the case.

    Outputs, loss and conv weight gradients; when the sum of |grad| over *all* trunk parameters
    (conv biases, BatchNorm affine) differs by more, that is shown too.
    """
    if not rec or not plain or rec.get("status") != "ok" or plain.get("status") != "ok":
        return "-"
    a, b = rec["check"], plain["check"]
    keys = [
        k
        for k in ("loss", "out_dot", "out_abs", "grad0_abs", "grad0_dot", "grad_conv_abs")
        if k in a and k in b
    ]
    if not keys:
        return "-"
    core = max(rel_diff(a[k], b[k], b.get(f"{k}_scale", 0.0)) for k in keys)
    text = f"{core:.1e}"
    if "grad_all_abs" in a and "grad_all_abs" in b:
        every = rel_diff(a["grad_all_abs"], b["grad_all_abs"])
        if every > max(10 * core, 1e-4):
            text += f" (all params {every:.1e})"
    return text


def fmt(v: float | None, spec: str = ".2f") -> str:
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def cell_time(rec: dict[str, Any] | None) -> str:
    if rec is None:
        return "-"
    if rec["status"] == "ok":
        return f"{rec['step_s']:.2f}"
    if rec["status"] == "skipped":
        return rec.get("short", "skipped")
    return rec["status"]


def render_table(records: list[dict[str, Any]]) -> str:
    by_key = {case_key(r): r for r in records}
    systems = sorted({r["system"] for r in records}, key=system_sort)
    streamed = [s for s in systems if s != "plain"]
    variants = [s for s in streamed if s.startswith("tilefn:")]
    rows = sorted(
        {(r["model"], r["size"], r["tile"], r["mode"]) for r in records if r["system"] != "plain"}
        | {
            (r["model"], r["size"], None, r["mode"])
            for r in records
            if r["system"] == "plain"
            and not any(
                q["system"] != "plain"
                and (q["model"], q["size"], q["mode"]) == (r["model"], r["size"], r["mode"])
                for q in records
            )
        },
        key=lambda k: (model_sort(k[0]), k[1], k[2] or 0, k[3] != "train", k[3]),
    )
    cols = ["model", "image", "tile", "a", "mode", "plain s", "tilefn s", "lightstream s"]
    cols += [f"{v} s" for v in variants]
    cols += ["tilefn/plain", "limit", "tilefn/limit", "tilefn/lightstream"]
    cols += [f"{v}/plain" for v in variants]
    cols += ["plain GB", "tilefn GB", "lightstream GB"] + [f"{v} GB" for v in variants]
    cols += ["tilefn vs plain", "lightstream vs plain"] + [f"{v} vs plain" for v in variants]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    for model, size, tile, mode in rows:
        plain = by_key.get((model, size, None, "plain", mode))
        rec = {s: by_key.get((model, size, tile, s, mode)) for s in streamed}
        rec.setdefault("tilefn", None)
        rec.setdefault("lightstream", None)
        t = {s: (r["step_s"] if r and r["status"] == "ok" else None) for s, r in rec.items()}
        tp = plain["step_s"] if plain and plain["status"] == "ok" else None
        a = next((r["a"] for r in (rec["tilefn"], *rec.values()) if r and r.get("a")), None)
        limit = None if a is None else (4 * a / 3 if mode == "train" else a)
        ratio = lambda num, den: num / den if num is not None and den else None
        tf_plain = ratio(t["tilefn"], tp)
        row = [
            model,
            f"{size}²",
            str(tile or "-"),
            fmt(a),
            mode,
            cell_time(plain),
            cell_time(rec["tilefn"]),
            cell_time(rec["lightstream"]),
        ]
        row += [cell_time(rec[v]) for v in variants]
        row += [
            fmt(tf_plain),
            fmt(limit),
            fmt(ratio(tf_plain, limit)),
            fmt(ratio(t["lightstream"], t["tilefn"])),
        ]
        row += [fmt(ratio(t[v], tp)) for v in variants]
        for r in (plain, rec["tilefn"], rec["lightstream"], *(rec[v] for v in variants)):
            row.append(fmt(gb(peak_bytes(r))) if r and r["status"] == "ok" else "-")
        for r in (rec["tilefn"], rec["lightstream"], *(rec[v] for v in variants)):
            row.append(agreement(r, plain))
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def render_block(records: list[dict[str, Any]], doc: Path, plot: Path | None) -> str:
    ok = [r for r in records if r.get("status") == "ok"]
    parts = [
        "_Generated by `benchmarks/compare.py`; edit the prose outside the markers, not this block._",
        "",
        render_table(records),
        "",
        "Times are seconds per step (minimum over repeats; `-`: not run). **a** is tilefn's overlap "
        "factor, **limit** the cost model's lower bound of tilefn/plain (4a/3 for train, a for "
        "infer), **tilefn/limit** = tilefn time / (limit x plain time), **tilefn/lightstream** the "
        "speed-up over lightstream. **GB** columns: peak resident memory of the whole worker process "
        "(`ru_maxrss`, 1e9 bytes; includes about 0.7 GB of Python and PyTorch). **vs plain**: largest "
        "relative difference from the plain run of the loss, two sums over the trunk output (of "
        "|y| and a random projection, whose difference is taken relative to the sum of |terms|) "
        "and, in train mode, the first conv's and all convs' weight gradients; \"all params\" is the "
        "sum of |grad| over every trunk parameter, shown where it differs more (lightstream does not "
        "compute exact BatchNorm weight and bias gradients; its own models freeze normalisation layers).",
    ]
    ls = {
        (r["model"], r["size"], r["tile"]): r
        for r in records
        if r["system"] == "lightstream" and "ls_backward_tiles" in r
    }
    tf = {(r["model"], r["size"], r["tile"]): r for r in ok if r["system"] == "tilefn"}
    if ls:
        parts += ["", "Tiles per step (forward / backward) and crop-area factors a:", ""]
        for key in sorted(ls, key=lambda k: (model_sort(k[0]), k[1], k[2])):
            r, t = ls[key], tf.get(key)
            tf_txt = f"; tilefn {t['n_tiles']} / {t['n_tiles']} tiles, a {t['a']:.2f}" if t else ""
            parts.append(
                f"- {key[0]} {key[1]}² tile {key[2]}: lightstream {r['ls_forward_tiles']} / "
                f"{r['ls_backward_tiles']} tiles, a {r['ls_forward_a']:.2f} / "
                f"{r['ls_backward_a']:.2f}{tf_txt}"
            )
    notes = sorted(
        {r["note"].splitlines()[-1] for r in records if r.get("status") != "ok" and r.get("note")}
    )
    if notes:
        parts += ["", "Notes: " + "; ".join(notes) + "."]
    facts = sorted(
        {
            (
                r.get("host", "?"),
                r.get("cpu", "?"),
                r.get("cpu_count"),
                r.get("torch", "?"),
                r.get("threads"),
            )
            for r in ok
        }
    )
    if facts:
        parts += ["", "Machine:", ""]
        for host, cpu, n, torch_v, threads in facts:
            parts.append(
                f"- `{host}`: {cpu}, {n} logical CPUs, torch {torch_v}, {threads} thread(s) per case"
            )
    cmds = sorted(
        {(r.get("date", "?"), r.get("commit", "?"), r.get("command", "?")) for r in records}
    )
    if cmds:
        parts += ["", "Produced by (date, tilefn commit, command):", ""]
        for date, commit, cmd in cmds:
            parts.append(f"- {date}, `{commit}`: `{cmd}`")
    if plot is not None:
        rel = os.path.relpath(plot.resolve(), doc.resolve().parent)
        parts += ["", f"![Peak RSS and train-step time against image side]({Path(rel).as_posix()})"]
    return "\n".join(parts)


DOC_INTRO = """# Benchmarks

`benchmarks/compare.py` runs the same network, image size and tile size through three systems,
each case in its own process: the **plain** model (the whole image at once), **tilefn**
(`tilefn.streamify(trunk, tile_size)`) and **lightstream** 1.0.7 (the reference system, built on
the CPU around the same trunk). The trunk is a torchvision network without its pooling and
classifier (`nn.Sequential(*list(resnet18(weights=None).children())[:-2]).eval()`), the image
a random float32 tensor of shape (1, 3, S, S); the head is a global average pool and a
`Linear(C, 2)` with a cross-entropy loss. A **train** step is trunk forward + head + loss +
backward (gradients of every trunk and head parameter), an **infer** step the trunk forward
under `torch.no_grad()`. Setup (tilefn's planning, lightstream's statistics pass) is timed
separately and not included.

By the cost model in the design notes, a streamed training step costs about 4a/3 times the
plain one and inference about a times, where a is the crop-area overlap factor of the tile
plan; the table shows how close tilefn comes to that limit.

To rerun (results are appended one line per case, so an interrupted run keeps its cases; the
table and plot below are re-rendered from the whole file):

```bash
pip install -e ".[bench]" && pip install --no-deps lightstream==1.0.7
python benchmarks/compare.py --models resnet18 --sizes 1024,1536,2048 --tiles 1024 \\
    --threads 1 --lightstream-max-tiles 100 --results benchmarks/results/resnet18.jsonl
python benchmarks/compare.py --report --results benchmarks/results/resnet18.jsonl  # render only
```

`python benchmarks/compare.py --help` lists every option (more models, sizes and tile sizes,
repeats, a second tilefn configuration, the memory limit for plain cases, timeouts).

## Results

"""


def write_doc(doc: Path, block: str) -> None:
    text = doc.read_text() if doc.exists() else DOC_INTRO + f"{MARK_START}\n{MARK_END}\n"
    if MARK_START not in text or MARK_END not in text:
        text = text.rstrip("\n") + f"\n\n{MARK_START}\n{MARK_END}\n"
    head, rest = text.split(MARK_START, 1)
    _, tail = rest.split(MARK_END, 1)
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(f"{head}{MARK_START}\n{block}\n{MARK_END}{tail}")


def write_plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    ok = [r for r in records if r.get("status") == "ok" and r["mode"] == "train"]
    colors = {"plain": "0.3", "tilefn": "tab:blue", "lightstream": "tab:orange"}
    extra = iter(["tab:green", "tab:purple", "tab:red", "tab:brown"])
    models = sorted({r["model"] for r in ok}, key=model_sort)
    styles = dict(zip(models, ["-", "--", ":", "-."] * 4))
    tiles = sorted({r["tile"] for r in ok if r["tile"]})
    markers = dict(zip(tiles, "osD^v<>p" * 4))
    lines: dict[tuple, list[dict[str, Any]]] = {}
    for r in ok:
        lines.setdefault((r["system"], r["model"], r["tile"]), []).append(r)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for (system, model, tile), recs in sorted(
        lines.items(), key=lambda kv: (system_sort(kv[0][0]), model_sort(kv[0][1]), kv[0][2] or 0)
    ):
        if system not in colors:
            colors[system] = next(extra, "k")
        recs.sort(key=lambda r: r["size"])
        xs = [r["size"] for r in recs]
        label = f"{system} {model}" + (f" tile {tile}" if tile else "")
        kw = dict(
            color=colors[system],
            linestyle=styles[model],
            marker=markers.get(tile, "x"),
            label=label,
        )
        axes[0].plot(xs, [gb(peak_bytes(r)) for r in recs], **kw)
        axes[1].plot(xs, [r["step_s"] for r in recs], **kw)
    sizes = sorted({r["size"] for r in ok})
    for ax, title, ylabel in (
        (axes[0], "peak RSS of a train step", "peak RSS (GB)"),
        (axes[1], "train-step time", "seconds"),
    ):
        ax.set_xscale("log", base=2)
        if sizes:
            ax.set_xticks(sizes, [str(s) for s in sizes])
            ax.set_xlim(sizes[0] / 1.15, sizes[-1] * 1.15)
        ax.set_xlabel("image side (px)")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(True, alpha=0.3)
        if not ok:
            ax.text(0.5, 0.5, "no train results", ha="center", transform=ax.transAxes)
    axes[1].set_yscale("log")
    plain_numbers = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
    axes[1].yaxis.set_major_formatter(plain_numbers)
    axes[1].yaxis.set_minor_formatter(plain_numbers)
    if ok:
        axes[1].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(args: argparse.Namespace) -> None:
    results = Path(args.results)
    if not results.exists():
        raise SystemExit(f"no results file {results}")
    records = load_results(results)
    plot = Path(args.plot) if args.plot else None
    if plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            print(
                "matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr
            )
            plot = None
        else:
            write_plot(records, plot)
            print(f"plot -> {plot}")
    if args.doc:
        write_doc(Path(args.doc), render_block(records, Path(args.doc), plot))
        print(f"table -> {args.doc}")
    print(render_table(records))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--models",
        type=csv(str),
        default=["resnet18", "resnet50"],
        help="comma-separated: tiny (a small test net) or torchvision model names; trunk = children()[:-2] (default: %(default)s)",
    )
    parser.add_argument(
        "--tiles",
        type=csv(int),
        default=[1024, 1536, 2048],
        help="tile sizes (px); tiles larger than the image are left out (default: %(default)s)",
    )
    parser.add_argument(
        "--sizes",
        type=csv(int),
        default=[2048, 3072, 4096, 8192],
        help="image sides S, image (1, 3, S, S) (default: %(default)s)",
    )
    parser.add_argument(
        "--systems",
        type=csv(str),
        default=["plain", "tilefn", "lightstream"],
        help="plain, tilefn, tilefn:LABEL, lightstream (default: %(default)s)",
    )
    parser.add_argument(
        "--modes",
        type=csv(str),
        default=["train", "infer"],
        help="train and/or infer (default: %(default)s)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=2,
        help="torch.set_num_threads and OMP_NUM_THREADS in each worker (default: %(default)s)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="timed steps per case; the minimum is reported (default: %(default)s)",
    )
    parser.add_argument(
        "--warmup",
        type=int,
        default=0,
        help="untimed steps before the timed ones, for every system (default: %(default)s)",
    )
    parser.add_argument(
        "--timeout", type=float, default=3600, help="seconds per case (default: %(default)s)"
    )
    parser.add_argument(
        "--max-plain-gb",
        type=float,
        default=18,
        help="skip plain cases whose estimated memory exceeds this many GB (default: %(default)s)",
    )
    parser.add_argument(
        "--lightstream-min-tile",
        type=int,
        default=1024,
        help="skip lightstream below this tile (its backward crashed on CPU at tile 512) (default: %(default)s)",
    )
    parser.add_argument(
        "--lightstream-max-tiles",
        type=int,
        default=0,
        help="skip lightstream train cases whose backward would run more tiles than this, found "
        "after its statistics pass (ResNet-18 discards about 490 px of gradient per tile side, so "
        "tile 1024 on a 2048^2 image needs 1156 backward tiles); 0: no limit (default: %(default)s)",
    )
    parser.add_argument(
        "--tilefn-options",
        action="append",
        metavar="[LABEL=]JSON",
        help="keyword arguments for tilefn.streamify: '{...}' for system tilefn, 'LABEL={...}' for system tilefn:LABEL; repeatable",
    )
    parser.add_argument(
        "--results",
        default="benchmarks/results/compare.jsonl",
        help="JSON-lines results file, appended to (default: %(default)s)",
    )
    parser.add_argument(
        "--report", action="store_true", help="only render the table and plot from --results"
    )
    parser.add_argument(
        "--doc",
        default="docs/benchmarks.md",
        help="markdown file whose results block is rewritten; '' for none (default: %(default)s)",
    )
    parser.add_argument(
        "--plot",
        default="docs/img/benchmarks.png",
        help="PNG written with matplotlib; '' for none (default: %(default)s)",
    )
    parser.add_argument("--worker", metavar="CASE_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker_main(args.worker)
        return
    for mode in args.modes:
        if mode not in ("train", "infer"):
            parser.error(f"--modes: unknown mode {mode!r}")
    if not args.report:
        run_all(args)
    report(args)


if __name__ == "__main__":
    main()
