"""peers.png: perplexity against average bits, one subplot per model, one line per tool and method
family. Runs in the peers venv (matplotlib stays out of the project's environment).

Usage: python plot.py peers.json peers.png
"""
from __future__ import annotations

import json
import sys

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

FAMILIES = [("rtn", "RTN", "s", "--"), ("gptq", "uniform GPTQ", "o", "-"), ("uniform", "uniform GPTQ", "o", "-"),
            ("ip", "mixed precision (IP, budget)", "D", "-."), ("tuned", "GPTQ + refine + norm tweak", "*", ":"),
            ("awq", "AWQ", "v", "-"), ("autoround", "AutoRound", "^", "-")]
COLORS = {"layerquant": "tab:blue", "llm-compressor": "tab:orange", "gptqmodel": "tab:green", "auto-round": "tab:red"}


def family(method: str) -> str:
    if "refine" in method or "normtweak" in method:
        return "tuned"
    return method.split("-")[0]


def main() -> int:
    every = json.load(open(sys.argv[1]))
    rows = [r for r in every if r["method"] != "float" and r.get("ppl") is not None]  # failed cases have no point
    floats = {r["model"]: r["ppl"] for r in every if r["method"] == "float" and r["tool"] == "layerquant"}
    models = sorted({r["model"] for r in every}, key=lambda m: (m != "stories260K", m))
    if not models:
        return 0
    fig, axes = plt.subplots(1, len(models), figsize=(6.5 * len(models), 5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for tool in COLORS:
            seen = set()
            for key, label, marker, style in FAMILIES:
                if label in seen:
                    continue
                keys = {k for k, lab, *_ in FAMILIES if lab == label}
                points = sorted((r["avg_bits"], r["ppl"], r["method"]) for r in rows
                                if r["model"] == model and r["tool"] == tool and family(r["method"]) in keys)
                if not points:
                    continue
                seen.add(label)
                xs, ys, names = zip(*points)
                ax.plot(xs, ys, marker=marker, linestyle=style, color=COLORS[tool], label=f"{tool}: {label}", markersize=7)
                for x, y, name in points:
                    ax.annotate(name.split(" ")[0], (x, y), textcoords="offset points", xytext=(4, 4), fontsize=6, color=COLORS[tool])
        if model in floats:
            ax.axhline(floats[model], color="gray", linestyle=":", label=f"float {floats[model]:.3f}")
        ax.set_yscale("log")
        ax.set_xlabel("average bits per weight (fp16 scales counted)")
        ax.set_ylabel("perplexity (layerquant's evaluator, log scale)")
        ax.set_title(model)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(sys.argv[2], dpi=110)
    return 0


if __name__ == "__main__":
    sys.exit(main())
