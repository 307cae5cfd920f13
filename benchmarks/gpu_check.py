"""One short GPU check: exactness (float64, float32, bf16 autocast) and plain-vs-tilefn
timing of ResNet trunks on one CUDA device. Not part of the tests.

    PYTHONPATH=. python benchmarks/gpu_check.py --out results_dir

Writes ``gpu_check.json`` and ``gpu_check.md`` (a markdown table) into ``--out`` and
prints them. Every timing is the median of ``--repeats`` steps after one warm-up, with
``sync()``; memory is ``torch.cuda.max_memory_allocated`` per case.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torchvision
from torch import nn

import tilefn

DEV = "cuda"


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def trunk(name: str) -> nn.Module:
    net = getattr(torchvision.models, name)(weights=None)
    return nn.Sequential(*list(net.children())[:-2]).eval()


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-300)).item()


def grads_of(model: nn.Module, f, x: torch.Tensor, g: torch.Tensor, autocast: bool):
    for p in model.parameters():
        p.grad = None
    with torch.autocast(DEV, dtype=torch.bfloat16, enabled=autocast):
        y = f(x)
    y.float().backward(g)
    return y.detach(), [p.grad.detach().clone() for p in model.parameters()]


def exactness(name: str, size: int, tile: int, dtype: torch.dtype, autocast: bool) -> dict:
    """Plain and streamed results in ``dtype`` (optionally under bf16 autocast), each
    against the plain model in float64: the streamed error should match the plain one."""
    torch.manual_seed(0)
    model = trunk(name).to(DEV, torch.float64)
    x = torch.randn(1, 3, size, size, device=DEV, dtype=torch.float64)
    with torch.no_grad():
        shape = model(x).shape
    cot = torch.randn(shape, device=DEV, dtype=torch.float64)
    y64, g64 = grads_of(model, model, x, cot, False)
    model = model.to(dtype)
    x, cot = x.to(dtype), cot.float()
    backbone, _ = tilefn.streamify(model, tile)
    y_ref, g_ref = grads_of(model, model, x, cot, autocast)
    y_str, g_str = grads_of(model, backbone, x, cot, autocast)
    out = {
        "check": f"{name} {size}² tile {tile} {str(dtype).split('.')[-1]}"
        + (" autocast bf16" if autocast else ""),
        "tiles": backbone.plan(x.shape).n_tiles,
        "plain_output_err": rel(y_ref, y64),
        "tilefn_output_err": rel(y_str, y64),
        "plain_grad_err": max(rel(a, b) for a, b in zip(g_ref, g64)),
        "tilefn_grad_err": max(rel(a, b) for a, b in zip(g_str, g64)),
        "tilefn_vs_plain_output": rel(y_str, y_ref),
        "tilefn_vs_plain_grad": max(rel(a, b) for a, b in zip(g_str, g_ref)),
    }
    return out


def timed(fn, repeats: int) -> tuple[float, float]:
    fn()  # warm-up (planning, cuDNN autotuning)
    sync()
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if DEV == "cuda" else float("nan")
    return statistics.median(times), peak


def timing(name: str, size: int, tile, repeats: int, bf16: bool, **options) -> list[dict]:
    torch.manual_seed(0)
    model = trunk(name).to(DEV)
    if options.get("channels_last"):
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(1, 3, size, size, device=DEV)
    backbone, _ = tilefn.streamify(model, tile, **options)
    plan = backbone.plan(x.shape)
    rows = []
    for label, f in (("plain", model), ("tilefn", backbone)):

        def train(f=f):
            for p in model.parameters():
                p.grad = None
            with torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
                y = f(x)
            y.float().mean().backward()

        def infer(f=f):
            with torch.no_grad(), torch.autocast(DEV, dtype=torch.bfloat16, enabled=bf16):
                f(x)

        try:
            t_train, m_train = timed(train, repeats)
            t_inf, m_inf = timed(infer, repeats)
        except torch.OutOfMemoryError:
            t_train = m_train = t_inf = m_inf = float("nan")
        if DEV == "cuda":
            torch.cuda.empty_cache()
        rows.append(
            {
                "case": f"{name} {size}² tile {plan.tile_size[0]}"
                + (" bf16" if bf16 else "")
                + "".join(f" {k}={v}" for k, v in options.items()),
                "system": label,
                "a": round(plan.overlap, 3),
                "tiles": plan.n_tiles,
                "train_s": t_train,
                "train_peak_gib": m_train,
                "infer_s": t_inf,
                "infer_peak_gib": m_inf,
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_check_out"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--quick", action="store_true", help="tiny sizes (smoke test)")
    parser.add_argument("--device", default="cuda", help="cuda, or cpu for a smoke test")
    parser.add_argument("--timing-only", action="store_true")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = True
    q = args.quick
    global DEV
    DEV = args.device
    name = torch.cuda.get_device_name() if DEV == "cuda" else "cpu"
    result: dict = {"device": name, "torch": torch.__version__}
    print(result, flush=True)
    checks = [
        ("resnet18", 512 if q else 1024, 448 if q else 512, torch.float64, False),
        ("resnet18", 1024 if q else 2048, 512 if q else 1024, torch.float32, False),
        ("resnet18", 1024 if q else 2048, 512 if q else 1024, torch.float32, True),
        ("resnet50", 1024, 512, torch.float32, False),
    ]
    result["exactness"] = []
    for c in checks if not args.timing_only else []:
        result["exactness"].append(exactness(*c))
        print(result["exactness"][-1], flush=True)
    r = args.repeats
    s = 1024 if q else 4096
    cases = [
        ("resnet18", s, s // 2, False, {}),
        ("resnet18", s, s // 2, False, {"memory_budget": 60 * 2**30}),
        ("resnet18", s, s // 2, True, {}),
        ("resnet18", s, s // 2, False, {"channels_last": True}),
        ("resnet50", s, s // 2, False, {}),
        ("resnet50", s, s // 2, True, {}),
        ("resnet18", 2 * s, s // 2, False, {}),
    ]
    result["timing"] = []
    for name, size, tile, bf16, options in cases:
        for row in timing(name, size, tile, r, bf16, **options):
            result["timing"].append(row)
            print(row, flush=True)
    (args.out / "gpu_check.json").write_text(json.dumps(result, indent=1))
    lines = [f"Device: {result['device']}, torch {result['torch']}", ""]
    lines += [
        "Errors against the plain model in float64 (max abs error over max abs value; for "
        "gradients the worst parameter):",
        "",
        "| check | tiles | plain output | tilefn output | plain grads | tilefn grads |",
        "|---|---|---|---|---|---|",
    ]
    for e in result["exactness"]:
        lines.append(
            f"| {e['check']} | {e['tiles']} | {e['plain_output_err']:.1e} | "
            f"{e['tilefn_output_err']:.1e} | {e['plain_grad_err']:.1e} | "
            f"{e['tilefn_grad_err']:.1e} |"
        )
    lines += [
        "",
        "| case | a | plain train s | tilefn train s | ratio | plain GiB | tilefn GiB "
        "| plain infer s | tilefn infer s | ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    rows = result["timing"]
    for p, t in zip(rows[::2], rows[1::2]):
        lines.append(
            f"| {t['case']} | {t['a']} | {p['train_s']:.3f} | {t['train_s']:.3f} | "
            f"{t['train_s'] / p['train_s']:.2f} | {p['train_peak_gib']:.1f} | "
            f"{t['train_peak_gib']:.1f} | {p['infer_s']:.3f} | {t['infer_s']:.3f} | "
            f"{t['infer_s'] / p['infer_s']:.2f} |"
        )
    (args.out / "gpu_check.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
