"""Failpoints: named places in the stages where a test can hold a process on purpose, to kill it exactly there.

etcd's gofail and TiKV's fail-rs do this for the same reason: a fault test that kills a process "during a stage"
by timing alone hits the stage only when the stage is slow, and on the sample several stages take a fraction of a
second. Here a test makes the kill land at a chosen point every time:

- `PRETRAIN_FAILPOINTS` names a directory (unset: every failpoint is a no-op costing one environment lookup);
- the test creates the file `<dir>/<name>` (the trigger);
- a process reaching `hold(name)` while the trigger exists writes `<dir>/<name>.reached` (its pid) and waits
  until the trigger is deleted, so the test can kill it while it waits, then delete the trigger and retry.

The points (the stages' shared skeleton places them, so every stage has them):
- `<stage>.unit-done`: a work unit's outputs and completion marker are written (ingest, filter, dedup);
- `<stage>.commit`: the stage's files are all written and its manifest is not (every data stage, evaluate).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

ENV = "PRETRAIN_FAILPOINTS"
POLL_S = 0.05


def hold(name: str) -> None:
    root = os.environ.get(ENV)
    if not root:
        return
    trigger = Path(root) / name
    if not trigger.exists():
        return
    reached = Path(root) / f"{name}.reached"
    tmp = reached.with_name(f"{reached.name}.{os.getpid()}.tmp")
    tmp.write_text(str(os.getpid()))
    tmp.replace(reached)
    while trigger.exists():
        time.sleep(POLL_S)
