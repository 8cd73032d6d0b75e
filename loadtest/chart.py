"""A PNG of TTFT and ITL percentiles per step per target (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

COLORS = {"chatq": "tab:blue", "vllm-server": "tab:orange", "synthetic": "tab:green"}
STYLES = {"p50": "-", "p95": "--", "p99": ":"}
X_LABELS = {
    "steps": "concurrent sessions",
    "rate": "arrival rate (req/s)",
    "overload": "arrival rate (req/s)",
    "streams": "concurrent streams",
}


def write_chart(path: Path, scenario: str, rows: list[dict[str, Any]], title: str) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    targets = list(dict.fromkeys(r["target"] for r in rows))
    for ax, metric, name in ((axes[0], "ttft_ms", "TTFT"), (axes[1], "itl_ms", "ITL (per chunk)")):
        values: list[float] = []
        for target in targets:
            mine = sorted((r for r in rows if r["target"] == target), key=lambda r: float(r["x"]))
            color = COLORS.get(target)
            for pct, style in STYLES.items():
                xs = [float(r["x"]) for r in mine if r["summary"][metric].get(pct) is not None]
                ys = [
                    float(r["summary"][metric][pct])
                    for r in mine
                    if r["summary"][metric].get(pct) is not None
                ]
                if not xs:
                    continue
                values += ys
                ax.plot(xs, ys, linestyle=style, marker="o", color=color, label=f"{target} {pct}")
        ticks = sorted({float(r["x"]) for r in rows})
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        ax.set_title(f"{name} (ms)")
        ax.set_xlabel(X_LABELS.get(scenario, "step"))
        ax.set_ylabel("ms")
        positive = [v for v in values if v > 0]
        if positive and max(positive) / min(positive) > 20:
            ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
        if values:
            ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
