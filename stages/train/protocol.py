"""What the launcher (stage.py) and the ranks (worker.py) say to each other, besides the config file: the
launcher's pid in the environment, and the line prefixes of rank 0's per-step records and final summary.
"""

from __future__ import annotations

import json

# The ranks stop when the launching process is gone (torchrun runs in a session of its own, so a SIGKILL of the
# flow run's process would otherwise leave it training beside the retry).
LAUNCHER_PID_ENV = "PRETRAIN_LAUNCHER_PID"
METRIC_PREFIX = "METRIC "
SUMMARY_PREFIX = "SUMMARY "


def parse(line: str, prefix: str) -> dict | None:
    """The JSON record after `prefix` in a line the ranks printed, or None."""
    idx = line.find(prefix)
    if idx < 0:
        return None
    try:
        return json.loads(line[idx + len(prefix) :])
    except json.JSONDecodeError:
        return None


def log(msg: str) -> None:
    """A line of the run's log, printed by rank 0 only."""
    import torch.distributed as dist  # (the launcher imports this module too, and never imports torch)

    if dist.is_initialized() and dist.get_rank() != 0:
        return
    print(f"[train] {msg}", flush=True)
