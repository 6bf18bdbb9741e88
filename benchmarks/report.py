"""What the driver writes: the stdout tables, JSON and CSV, and the PNG plots."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Dict, List

from .cases import BASELINE_ORDER
from .measure import MODES

MODE_TITLES = {"fwd+bwd": "forward+backward", "fwd": "forward only (no_grad)", "bwd": "backward only"}


def impl_order(rows) -> List[str]:
    present = {k for r in rows for k in r.get("timings", {})}
    return ["fused_wloss"] + [n for n in BASELINE_ORDER if n in present]


def _fmt_ms(t: float) -> str:
    return f"{t:.3g}" if t < 100 else f"{t:.0f}"


def format_table(rows, mode: str) -> str:
    """One line per case: fused_wloss's median (and half the interquartile range, in % of it), every
    baseline's median over fused_wloss's, the floor and fused_wloss's share of its bandwidth."""
    names = impl_order(rows)
    w = 15
    lines = [f"== {MODE_TITLES[mode]}: fused_wloss median ms (±half IQR); every other column: its time / "
             f"fused_wloss's (> 1: fused_wloss faster), its median ms in brackets; others: the CPU share "
             f"other processes used meanwhile ==",
             f"{'case':28} {'MB':>6} " + " ".join(f"{n:>{w}}" for n in names)
             + f" {'floor ms':>8} {'%floor bw':>9} {'others':>6}"]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['case']:28} {r['error']}")
            continue
        t = {k: v[mode] for k, v in r["timings"].items() if mode in v}
        if "fused_wloss" not in t:
            continue
        ours = t["fused_wloss"]["median_ms"]
        spread = (t["fused_wloss"]["q3_ms"] - t["fused_wloss"]["q1_ms"]) / 2 / ours * 100
        cells = [f"{_fmt_ms(ours)} ±{spread:.0f}%"]
        for n in names[1:]:
            cells.append(f"{t[n]['median_ms'] / ours:.2f}x ({_fmt_ms(t[n]['median_ms'])})" if n in t else "-")
        floor = t["floor"]["median_ms"]
        lines.append(f"{r['case']:28} {r['logits_mb']:6.1f} " + " ".join(f"{c:>{w}}" for c in cells)
                     + f" {_fmt_ms(floor):>8} {_pct(100 * floor / ours):>9} {_others(r):>6}")
    return "\n".join(lines)


def _others(r) -> str:
    v = r.get("other_load")
    return "?" if v is None else f"{100 * v:.0f}%"


def format_memory(rows) -> str:
    names = impl_order(rows)
    w = 15
    lines = ["== memory, MB: peak of forward+backward above the inputs / saved for backward "
             "(beyond the inputs) ==",
             f"{'case':28} {'MB':>6} " + " ".join(f"{n:>{w}}" for n in names)]
    for r in rows:
        mem = r.get("memory")
        if not mem:
            continue
        cells = []
        for n in names:
            m = mem.get(n, {}).get("fwd+bwd")
            cells.append(f"{m['peak_bytes'] / 2**20:.1f} / {m['saved_bytes'] / 2**20:.1f}" if m else "-")
        lines.append(f"{r['case']:28} {r['logits_mb']:6.1f} " + " ".join(f"{c:>{w}}" for c in cells))
    return "\n".join(lines)


BUSY = 0.10  # other processes' share of the CPUs above which a case's times are flagged


def format_notes(rows) -> str:
    lines = []
    busy = [f"{r['case']} ({100 * r['other_load']:.0f}%)" for r in rows if (r.get("other_load") or 0) > BUSY]
    if busy:
        lines.append("other processes used a share of the CPUs while these cases were timed, so their times "
                     "are inflated (small calls most): " + ", ".join(busy))
    for r in rows:
        for name, msg in r.get("skipped", {}).items():
            lines.append(f"{r['case']}: {name} not timed: {msg}")
        if r.get("backend") == "reference":
            lines.append(f"{r['case']}: fused_wloss is served by its reference on this device "
                         "(no compiled kernel): its times are the reference's")
    return "\n".join(lines)


# -- files -------------------------------------------------------------------------------------------

CSV_FIELDS = ["case", "loss", "shape", "weighting", "dtype", "logits_mb", "impl", "mode", "median_ms",
              "q1_ms", "q3_ms", "min_ms", "reps", "gb_per_s", "floor_ms", "pct_floor_bandwidth",
              "ratio_to_fused", "peak_mb", "saved_mb", "other_load", "backend", "device", "device_name", "cores",
              "torch", "date"]


def write_json(path: Path, machine: dict, settings: dict, rows) -> None:
    path.write_text(json.dumps({"machine": machine, "settings": settings, "rows": rows}, indent=1))


def write_csv(path: Path, machine: dict, rows) -> None:
    device_name = machine.get("gpu") or machine.get("cpu")
    with open(path, "w", newline="") as f:
        wr = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        wr.writeheader()
        for r in rows:
            for impl, modes in r.get("timings", {}).items():
                for mode, m in modes.items():
                    mem = r.get("memory", {}).get(impl, {}).get(mode, {})
                    ours = r["timings"].get("fused_wloss", {}).get(mode)
                    wr.writerow({
                        "case": r["case"], "loss": r["loss"], "shape": "x".join(map(str, r["shape"])),
                        "weighting": r["weighting"], "dtype": r["dtype"], "logits_mb": f"{r['logits_mb']:.2f}",
                        "impl": impl, "mode": mode, "median_ms": f"{m['median_ms']:.4f}",
                        "q1_ms": f"{m['q1_ms']:.4f}", "q3_ms": f"{m['q3_ms']:.4f}", "min_ms": f"{m['min_ms']:.4f}",
                        "reps": m["reps"], "gb_per_s": f"{m['gb_per_s']:.2f}",
                        "floor_ms": f"{r['timings']['floor'][mode]['median_ms']:.4f}",
                        "pct_floor_bandwidth": f"{m['pct_floor_bandwidth']:.1f}",
                        "ratio_to_fused": f"{m['median_ms'] / ours['median_ms']:.3f}" if ours else "",
                        "peak_mb": f"{mem['peak_bytes'] / 2**20:.2f}" if "peak_bytes" in mem else "",
                        "saved_mb": f"{mem['saved_bytes'] / 2**20:.2f}" if "saved_bytes" in mem else "",
                        "other_load": "" if r.get("other_load") is None else f"{r['other_load']:.3f}",
                        "backend": r["backend"], "device": machine["device"], "device_name": device_name,
                        "cores": machine["cores"], "torch": machine["torch"], "date": machine["date"],
                    })


# -- plots -------------------------------------------------------------------------------------------

def _label(machine) -> str:
    dev = machine.get("gpu") or f"{machine['cpu']}, {machine['cores']} cores"
    return f"{dev} | torch {machine['torch']} | {machine['date'][:10]}"


def plot(rows, machine: dict, stem: Path) -> List[Path]:
    """``<stem>-time.png``: median time vs number of classes C, one line per implementation, a
    panel per (loss, weighting, dtype) and mode. ``<stem>-floor.png``: each implementation's
    bandwidth as a percent of the floor's, per case. Returns the files written."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator

    plain = FuncFormatter(lambda v, _: f"{v:g}")

    def log_axis(axis):
        axis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        axis.set_major_formatter(plain)
        axis.set_minor_formatter(FuncFormatter(lambda v, _: ""))

    rows = [r for r in rows if "timings" in r and "fused_wloss" in r["timings"]]
    if not rows:
        return []
    names = impl_order(rows) + ["floor"]
    colors = {n: plt.get_cmap("tab10")(i) for i, n in enumerate(names)}
    # time vs C: the 2-D cases (N x C) of one loss, weighting and dtype, where there are at least two
    # class counts (all groups when none has two, so that a small run still gets its plot)
    groups: Dict[tuple, list] = {}
    for r in rows:
        if len(r["shape"]) == 2:
            groups.setdefault((r["loss"], r["weighting"], r["dtype"]), []).append(r)
    swept = {k: g for k, g in groups.items() if len({r["num_classes"] for r in g}) > 1}
    groups = swept or groups or {("all", "", ""): rows}
    written = []

    fig, axes = plt.subplots(len(groups), len(MODES), squeeze=False)
    for gi, ((loss, weighting, dtype), grows) in enumerate(sorted(groups.items())):
        grows = sorted(grows, key=lambda r: (r["num_classes"], r["logits_mb"]))
        for mi, mode in enumerate(MODES):
            ax = axes[gi][mi]
            for n in names:
                pts = [(r["num_classes"], r["timings"][n][mode]["median_ms"]) for r in grows
                       if n in r["timings"] and mode in r["timings"][n]]
                if not pts:
                    continue
                style = dict(linestyle="--", marker="") if n == "floor" else dict(marker="o", markersize=4)
                ax.plot([p[0] for p in pts], [p[1] for p in pts], label=n, color=colors[n],
                        linewidth=2.2 if n == "fused_wloss" else 1.2, **style)
            ax.set_xscale("log")
            ax.set_yscale("log")
            log_axis(ax.yaxis)
            ticks = sorted({r["num_classes"] for r in grows})
            ax.set_xticks(ticks)
            ax.set_xticklabels([f"{c}\n" + ", ".join("x".join(map(str, r["shape"])) for r in grows
                                                      if r["num_classes"] == c) for c in ticks], fontsize=7)
            ax.xaxis.set_minor_formatter(FuncFormatter(lambda v, _: ""))
            ax.set_xlim(ticks[0] / 2.5, ticks[-1] * 2.5)
            ax.set_title(f"{loss} {weighting} {dtype}: {MODE_TITLES[mode]}", fontsize=9)
            ax.set_xlabel("classes C (shape below)", fontsize=8)
            ax.set_ylabel("median ms", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(True, which="both", alpha=0.3)
    handles, labels = [], []
    for ax in axes.flat:
        for h, l in zip(*ax.get_legend_handles_labels()):
            if l not in labels:
                handles.append(h)
                labels.append(l)
    order = sorted(range(len(labels)), key=lambda i: names.index(labels[i]) if labels[i] in names else 99)
    handles, labels = [handles[i] for i in order], [labels[i] for i in order]
    height = 3.4 * len(groups) + 0.8
    fig.set_size_inches(4.6 * len(MODES), height)
    fig.suptitle(f"time vs number of classes (lower is better) | {_label(machine)}", fontsize=10,
                 y=1 - 0.1 / height)
    fig.legend(handles, labels, loc="upper center", ncol=len(labels), fontsize=8, frameon=False,
               bbox_to_anchor=(0.5, 1 - 0.35 / height))
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.75 / height))
    path = Path(f"{stem}-time.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)

    fig, axes = plt.subplots(2, 1, figsize=(max(8.0, 0.75 * len(rows) + 2), 8), squeeze=False)
    impls = [n for n in names if n != "floor"]
    width = 0.8 / len(impls)
    for ax, mode in zip(axes[:, 0], ("fwd+bwd", "fwd")):
        for k, n in enumerate(impls):
            xs, ys = [], []
            for i, r in enumerate(rows):
                m = r["timings"].get(n, {}).get(mode)
                if m:
                    xs.append(i - 0.4 + (k + 0.5) * width)
                    ys.append(m["pct_floor_bandwidth"])
            ax.bar(xs, ys, width=width, label=n, color=colors[n])
        ax.axhline(100, color="black", linewidth=0.8, linestyle="--")
        ax.set_yscale("log")
        log_axis(ax.yaxis)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels([r["case"] for r in rows], rotation=35, ha="right", fontsize=7)
        ax.set_ylabel("% of the floor's bandwidth", fontsize=8)
        ax.set_title(f"{MODE_TITLES[mode]}: bandwidth as % of the floor measured in the same run "
                     f"(higher is better; 100% = the floor)", fontsize=9)
        ax.grid(True, axis="y", which="both", alpha=0.3)
        ax.tick_params(axis="y", labelsize=7)
    axes[0, 0].legend(fontsize=7, ncol=len(impls), loc="lower center", bbox_to_anchor=(0.5, 1.08),
                      frameon=False)
    fig.suptitle(_label(machine), fontsize=10)
    fig.tight_layout()
    path = Path(f"{stem}-floor.png")
    fig.savefig(path, dpi=90)
    plt.close(fig)
    written.append(path)
    return written


def _pct(v: float) -> str:
    return f"{v:.0f}%" if v >= 10 else f"{v:.2g}%"


# -- the README's table ------------------------------------------------------------------------------

def markdown_table(data: dict, mode: str = "fwd+bwd") -> str:
    """A Markdown table of a results file: fused_wloss's median, its speed-up over each baseline
    (their time / ours; for torch.compile the faster of the compiled baselines), its share of the
    floor's bandwidth, and peak / saved memory next to torch's."""
    lines = ["| case | logits MB | fused_wloss ms | vs reference | vs torch | vs recipe | vs torch.compile "
             "| % of floor bandwidth | peak MB: ours / torch | saved for backward MB: ours / torch "
             "| forward only vs torch | other jobs' CPU share |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]

    def ratio(t, name, m):
        return f"{t[name][m]['median_ms'] / t['fused_wloss'][m]['median_ms']:.1f}x" if name in t else "-"

    def mem(r, name, key):
        m = r.get("memory", {}).get(name, {}).get("fwd+bwd", {})
        return f"{m[key] / 2**20:.1f}" if key in m else "-"

    for r in data["rows"]:
        if "timings" not in r:
            lines.append(f"| {r['case']} | | {r.get('error', 'not timed')} |" + " |" * 9)
            continue
        t = r["timings"]
        ours = t["fused_wloss"][mode]
        compiled = [n for n in ("compile(torch)", "compile(recipe)") if n in t]
        best = min(compiled, key=lambda n: t[n][mode]["median_ms"]) if compiled else None
        torch_name = "torch" if "torch" in t else "recipe"
        lines.append(
            f"| {r['case']} | {r['logits_mb']:.1f} | {ours['median_ms']:.3g} | {ratio(t, 'reference', mode)} "
            f"| {ratio(t, 'torch', mode)} | {ratio(t, 'recipe', mode)} | {ratio(t, best, mode) if best else '-'} "
            f"| {_pct(ours['pct_floor_bandwidth'])} | {mem(r, 'fused_wloss', 'peak_bytes')} / "
            f"{mem(r, torch_name, 'peak_bytes')} | {mem(r, 'fused_wloss', 'saved_bytes')} / "
            f"{mem(r, torch_name, 'saved_bytes')} | {ratio(t, torch_name, 'fwd')} | {_others(r)} |")
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.report",
                                description="Print a results file as the README's Markdown table.")
    p.add_argument("results", help="a JSON file written by python -m benchmarks")
    p.add_argument("--mode", default="fwd+bwd", choices=list(MODES))
    a = p.parse_args()
    print(markdown_table(json.loads(Path(a.results).read_text()), a.mode))
