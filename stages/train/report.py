"""What a finished training run shows people: the loss curve (PNG) and a table of its metrics.

Both are built from the run folder's `metrics.jsonl` (rank 0's per-step records), so they describe the whole run
even when it was resumed several times. The plot is saved next to the checkpoints as `loss_curve.png`; the flow
turns it and the table into Prefect artifacts. matplotlib with the Agg backend: no display needed.
"""

from __future__ import annotations

import io
import json

from stages.core import storage
from stages.core.config import PipelineConfig
from stages.train.checkpoints import METRICS

PLOT = "loss_curve.png"


def read_metrics(run: str, cfg: PipelineConfig) -> list[dict]:
    uri = storage.join(run, METRICS)
    if not storage.exists(uri, cfg.storage):
        return []
    with storage.open_uri(uri, "r", cfg.storage) as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curve_png(records: list[dict], title: str = "") -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    steps = [r["step"] for r in records]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    ax.plot(steps, [r["loss"] for r in records], label="train loss", linewidth=1.2)
    val = [(r["step"], r["val_loss"]) for r in records if r.get("val_loss") is not None]
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=4)
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    ax.grid(alpha=0.3)
    lr_ax = ax.twinx()
    lr_ax.plot(steps, [r["lr"] for r in records], color="gray", linewidth=0.8, alpha=0.6, label="learning rate")
    lr_ax.set_ylabel("learning rate")
    lines = ax.get_legend_handles_labels()
    lr_lines = lr_ax.get_legend_handles_labels()
    ax.legend(lines[0] + lr_lines[0], lines[1] + lr_lines[1], loc="upper right")
    ax.set_title(title)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def metrics_table(records: list[dict], rows: int = 20) -> list[dict]:
    """About `rows` evenly spaced steps, always including the first and the last."""
    if not records:
        return []
    stride = max(1, len(records) // rows)
    picked = records[::stride]
    if picked[-1] is not records[-1]:
        picked.append(records[-1])
    columns = ("step", "loss", "val_loss", "lr", "grad_norm", "tokens_per_s", "flops_per_s", "mfu", "memory_mb")
    rows = [{c: r.get(c) for c in columns} for r in picked]
    for row, record in zip(rows, picked):  # a mixture: tokens trained on and epochs over each source so far
        for name, source in (record.get("sources") or {}).items():
            row[f"{name} tokens"] = source["tokens"]
            row[f"{name} epochs"] = source["epochs"]
    return rows


def write(run: str, cfg: PipelineConfig) -> dict:
    """Save the plot of the run at `run` beside its checkpoints; returns the records, the PNG bytes and where it
    went."""
    records = read_metrics(run, cfg)
    if not records:
        return {"records": [], "png": None, "png_uri": None}
    png = loss_curve_png(records, title=f"{cfg.name}: {records[-1]['step']} steps")
    uri = storage.join(run, PLOT)
    with storage.atomic_write(uri, cfg.storage) as f:
        f.write(png)
    return {"records": records, "png": png, "png_uri": uri}
