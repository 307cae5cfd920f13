"""The report side of ``compare.py``: the results file rendered as a table, a doc block and a plot.

``load_results`` keeps the newest record per case, ``render_table`` makes the markdown table,
``render_block`` the whole generated block (table, legend, tile counts, notes, machines,
commands, plot link), ``write_doc`` puts it between the ``results`` markers of a markdown file
(which it creates from ``DOC_INTRO`` when missing) and ``write_plot`` draws the PNG.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from _cases import case_key, gb, peak_bytes

MARK_START = "<!-- results:start -->"
MARK_END = "<!-- results:end -->"
SYSTEM_ORDER = ("plain", "tilefn", "lightstream")
MODEL_NAMES = ("tiny", "resnet18", "resnet34", "resnet50")


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


DOC_INTRO = r"""# Benchmarks

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

By the cost model (see [How it works](how-it-works.md) /
[the design page](design.md#cost-model)), a streamed training step costs about 4a/3 times the
plain one and inference about a times, where a is the crop-area overlap factor of the tile
plan; the table shows how close tilefn comes to that limit.

To rerun (results are appended one line per case, so an interrupted run keeps its cases; the
table and plot below are re-rendered from the whole file):

```bash
pip install -e ".[bench]" && pip install --no-deps lightstream==1.0.7
R=benchmarks/results/cpu.jsonl
B='budget={"memory_budget": 12000000000}'
python benchmarks/compare.py --results $R --lightstream-max-tiles 40 --models resnet18 \
    --sizes 2048,3072,4096 --tiles 1024,1536,2048 --modes train \
    --systems plain,tilefn,tilefn:budget,lightstream --tilefn-options "$B"
python benchmarks/compare.py --results $R --models resnet50 --sizes 2048 \
    --tiles 1024,1536,2048 --modes train --systems plain,tilefn,tilefn:budget,lightstream \
    --tilefn-options "$B"
python benchmarks/compare.py --results $R --warmup 1 --models resnet18 \
    --sizes 2048,3072,4096 --tiles 1024,1536,2048 --modes infer --systems plain,tilefn,lightstream
python benchmarks/compare.py --results $R --warmup 1 --models resnet50 --sizes 2048 \
    --tiles 1024,1536,2048 --modes infer --systems plain,tilefn,lightstream
python benchmarks/compare.py --results $R --models resnet18 --sizes 8192,16384 --tiles 2048 \
    --systems plain,tilefn --modes train
python benchmarks/compare.py --report --results $R  # render the table and plot only
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


def report(results: str, doc: str | None, plot: str | None) -> None:
    """Render ``results`` into the doc block of ``doc`` and the PNG ``plot`` (None: neither),
    then print the table."""
    results_path = Path(results)
    if not results_path.exists():
        raise SystemExit(f"no results file {results_path}")
    records = load_results(results_path)
    plot_path = Path(plot) if plot is not None else None
    if plot_path is not None:
        if importlib.util.find_spec("matplotlib") is None:
            print(
                "matplotlib is not installed (pip install -e '.[bench]'): no plot", file=sys.stderr
            )
            plot_path = None
        else:
            write_plot(records, plot_path)
            print(f"plot -> {plot_path}")
    if doc is not None:
        write_doc(Path(doc), render_block(records, Path(doc), plot_path))
        print(f"table -> {doc}")
    print(render_table(records))
