"""PNG plots of evaluation results (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot(out_dir: str | Path):
    """matplotlib's pyplot without a display, and the output folder (made)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    return plt, out_dir


def niah_heatmaps(result: dict, out_dir: str | Path) -> list[Path]:
    """One heatmap per policy and mode: accuracy over prompt length x needle depth."""
    plt, out_dir = _pyplot(out_dir)
    cells: dict = {}
    for c in result["cases"]:
        key = (c["policy"], c["mode"])
        hit, n = cells.setdefault(key, {}).get((c["length"], c["depth"]), (0, 0))
        cells[key][(c["length"], c["depth"])] = (hit + int(c["correct"]), n + 1)
    written = []
    for (policy, mode), grid in cells.items():
        lengths = sorted({k[0] for k in grid})
        depths = sorted({k[1] for k in grid})
        acc = [[grid[(L, d)][0] / grid[(L, d)][1] if (L, d) in grid else float("nan") for L in lengths]
               for d in depths]
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(lengths), 1.2 + 0.5 * len(depths)))
        im = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(f"{policy} ({mode})", fontsize=9)
        fig.colorbar(im, ax=ax, fraction=0.05)
        fig.tight_layout()
        path = out_dir / f"niah_{policy.replace('%', 'pct').replace('@', '_')}_{mode}.png"
        fig.savefig(path, dpi=80)
        plt.close(fig)
        written.append(path)
    return written


def sweep_curves(result: dict, out_dir: str | Path, prefix: str = "sweep") -> list[Path]:
    """One PNG per task of a budget sweep (:mod:`kvpolicy.eval.sweep`): score against
    budget, one line per policy, the full cache and 90% of it dashed."""
    plt, out_dir = _pyplot(out_dir)
    budgets = result["budgets"]
    xs = [float(b.rstrip("%")) for b in budgets]
    written = []
    for task, scores in result["scores"].items():
        fig, ax = plt.subplots(figsize=(7.6, 4.0))
        full = result["full"][task]
        ax.axhline(full, color="black", linestyle="--", linewidth=1, label="full cache")
        ax.axhline(result["threshold"] * full, color="grey", linestyle=":", linewidth=1,
                   label=f"{result['threshold']:.0%} of full")
        for policy in result["policies"]:
            ys = [scores.get(f"{policy}@{b}", float("nan")) for b in budgets]
            ax.plot(xs, ys, marker="o", markersize=3, label=policy)
        ax.set_xscale("log")
        ax.set_xticks(xs, budgets)
        ax.minorticks_off()
        ax.set_xlabel("KV cache kept (share of the prompt)")
        ax.set_ylabel("ppl(full) / ppl(policy)" if task == "ppl" else "share answered")
        ax.set_ylim(-0.03, 1.03 * max(1.0, full))
        ax.set_title(f"{task} ({result.get('model', 'model')})", fontsize=10)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        fig.tight_layout()
        path = out_dir / f"{prefix}_{task.replace(' ', '_')}.png"
        fig.savefig(path, dpi=90)
        plt.close(fig)
        written.append(path)
    return written
