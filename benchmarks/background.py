"""Exact background skipping, measured side by side: slides with 30 % and 50 % tissue on constant
(masked) background, and the same slides with textured background where nothing can be
skipped; tilefn with skipping (the default), tilefn without (``skip_constant=False``),
lightstream, and plain PyTorch where it fits. One subprocess per case (peak RSS is the
process's ``ru_maxrss``); the cases run one after another in one invocation, so the ratios
compare runs on the same machine state.

    python benchmarks/background.py                      # tiny trunk, 4096^2, tile 512
    python benchmarks/background.py --model resnet18 --size 2048 --tile 1024
    python benchmarks/background.py --doc docs/benchmarks.md --plot docs/img/background.png

The target (issue "Real slides, fast"): a train step on the constant-background slide takes at
most ``(1 - f) + 0.1`` times the step on the textured one, where ``f`` is the fraction of
crop area that is constant.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _cases import gb, machine_facts, peak_bytes, run_worker  # noqa: E402

START, END = "<!-- background:start -->", "<!-- background:end -->"


def cases(args: argparse.Namespace) -> list[dict[str, Any]]:
    have_lightstream = importlib.util.find_spec("lightstream") is not None
    out = []
    base = {
        "model": args.model,
        "size": args.size,
        "tile": args.tile,
        "threads": args.threads,
        "repeats": args.repeats,
        "warmup": 1,
        "max_plain_gb": args.max_plain_gb,
        "lightstream_max_tiles": 0,
        "paired": True,
    }
    for tissue in args.tissue:
        slide = {"tissue": tissue, "textured": False}
        for mode in args.modes:
            systems = [("tilefn", {}), ("tilefn-noskip", {"skip_constant": False})]
            if have_lightstream and mode == "train":
                systems.append(("lightstream", {}))
            systems.append(("plain", {}))
            for system, options in systems:
                out.append(
                    {**base, "system": system, "mode": mode, "slide": slide, "options": options}
                )
    return out


def _computed(stats: dict) -> str:
    return " / ".join(
        f"{stats[k]['computed']} of {stats[k]['crops']}"
        for k in ("forward", "backward")
        if k in stats
    )


def table(records: list[dict[str, Any]]) -> str:
    rows = [
        "| tissue | mode | system | step, constant background (s) | step, textured (s) | "
        "ratio | target (1 - f) + 0.1 | crops computed (fwd / bwd), constant | peak RSS (GB) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        tissue = f"{round(100 * r['slide']['tissue'])} %"
        if r["status"] != "ok":
            rows.append(
                f"| {tissue} | {r['mode']} | {r['system']} | {r.get('short') or r['status']} "
                "| | | | | |"
            )
            continue
        f = r.get("constant_fraction")
        target = f"{(1 - f) + 0.1:.2f}x (f = {f:.2f})" if f is not None else ""
        rows.append(
            f"| {tissue} | {r['mode']} | {r['system']} | {r['step_s']:.2f} | "
            f"{r['paired_step_s']:.2f} | **{r['step_s'] / r['paired_step_s']:.2f}x** | {target} | "
            f"{_computed(r.get('stats', {}))} | {gb(peak_bytes(r)):.2f} |"
        )
    return "\n".join(rows)


def plot(records: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in records if r["status"] == "ok"]
    groups = sorted({(r["slide"]["tissue"], r["mode"]) for r in ok})
    systems = [
        s
        for s in ("tilefn", "tilefn-noskip", "lightstream", "plain")
        if any(r["system"] == s for r in ok)
    ]
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.6), squeeze=False)
    for ax, (tissue, mode) in zip(axes[0], groups):
        for j, system in enumerate(systems):
            match = [
                r
                for r in ok
                if r["system"] == system and (r["slide"]["tissue"], r["mode"]) == (tissue, mode)
            ]
            if not match:
                continue
            r = match[0]
            ax.bar(
                j - 0.2, r["step_s"], 0.4, color="tab:blue", label="constant bg" if j == 0 else None
            )
            ax.bar(
                j + 0.2,
                r["paired_step_s"],
                0.4,
                color="tab:gray",
                label="textured" if j == 0 else None,
            )
        ax.set_xticks(range(len(systems)), systems, rotation=30, fontsize=8)
        ax.set_title(f"{round(100 * tissue)} % tissue, {mode}", fontsize=9)
        ax.set_ylabel("step (s)")
    axes[0][0].legend(fontsize=8)
    fig.suptitle(
        "Background skipping: the same slide with constant or textured background", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny", help="tiny or a torchvision model name")
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--tile", type=int, default=512)
    p.add_argument("--tissue", type=float, nargs="+", default=[0.3, 0.5])
    p.add_argument("--modes", nargs="+", default=["train", "infer"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--max-plain-gb", type=float, default=16.0)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--results", default="benchmarks/results/background.json")
    p.add_argument("--doc", default=None, help="rewrite the table in this markdown file")
    p.add_argument("--plot", default=None, help="write a bar chart here (PNG)")
    args = p.parse_args(argv)

    records = []
    for case in cases(args):
        rec = run_worker(case, args.timeout)
        records.append(rec)
        status = (
            f"{rec['step_s']:.2f} s constant, {rec['paired_step_s']:.2f} s textured"
            if rec["status"] == "ok"
            else rec.get("short") or rec.get("note") or rec["status"]
        )
        tissue = rec["slide"]["tissue"]
        print(f"{tissue:.0%} tissue {rec['mode']} {rec['system']}: {status}", flush=True)
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(
        json.dumps({"machine": machine_facts(), "records": records}, indent=1)
    )
    text = table(records)
    print(text)
    if args.doc:
        doc = Path(args.doc)
        body = doc.read_text()
        facts = machine_facts()
        block = (
            f"{START}\n`python benchmarks/background.py --model {args.model} --size {args.size} "
            f"--tile {args.tile}` ({facts.get('cpu', 'CPU')}, {args.threads} threads; each step the best "
            f"of {args.repeats}, the two slides timed alternately in one process):\n\n{text}\n{END}"
        )
        if START in body:
            body = body[: body.index(START)] + block + body[body.index(END) + len(END) :]
        else:
            body += "\n" + block + "\n"
        doc.write_text(body)
    if args.plot:
        plot(records, Path(args.plot))


if __name__ == "__main__":
    main()
