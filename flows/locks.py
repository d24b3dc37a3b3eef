"""One builder per stage output across flow runs: a Prefect global concurrency limit of 1, named after the output.

Two runs of one config at once (the deployment started twice, a scheduled refresh firing during a manual run) would
otherwise build the same stage version side by side. They could not corrupt it (every stage writes under temporary
names, commits atomically and writes its manifest last), but both would pay for the work, and the later commit
would swap files under a reader of the first. Holding the output's limit while a stage runs makes the second run
wait, then find the output complete and skip it ("up to date"), as a rerun does.

Why a limit on the Prefect server and not a file lock: flow runs may sit on different machines (work pools, Slurm
nodes) and outputs on S3, and the server is the one thing they all reach. The name holds a digest of the output's
URI, whose last part is the stage version, so runs of different configs (or of one config into different roots)
never wait on each other. A slot is a lease the holder renews: when a flow process is killed while it builds, the
slot frees itself within LEASE_SECONDS, which bounds how long another run waits for a holder that is gone.

A retry of the killed run itself does not wait even that long: while a lease is held its id is kept in a Prefect
variable named like the limit, with the flow run that holds it (a killed holder leaves it behind), and a flow run
that finds its own earlier attempt holding the lock releases that lease first (Prefect retries only a run that has
ended, so that attempt is gone). Prefect's `concurrency()` does not expose the lease id, hence its lease functions
are used here directly.
"""

from __future__ import annotations

import contextlib
import hashlib
import time
import uuid
from collections.abc import Callable, Iterator

from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency._leases import maintain_concurrency_lease
from prefect.concurrency._sync import acquire_concurrency_slots_with_lease, release_concurrency_slots_with_lease
from prefect.exceptions import ObjectAlreadyExists
from prefect.runtime import flow_run
from prefect.variables import Variable

LEASE_SECONDS = 60.0  # the server's minimum; renewed every 45 s by Prefect's lease thread while the stage runs


def limit_name(stage: str, output_uri: str) -> str:
    return f"pretrain-{stage}-{hashlib.sha256(output_uri.encode()).hexdigest()[:16]}"


@contextlib.contextmanager
def output_lock(stage: str, output_uri: str, log: Callable[[str], None]) -> Iterator[None]:
    """Hold `stage`'s output for this flow run; another run holding it makes this one wait."""
    name = limit_name(stage, output_uri)
    with get_client(sync_client=True) as client:
        try:
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
        except ObjectAlreadyExists:
            pass  # made by an earlier run, or by the run this one races
    run_id = flow_run.id  # None outside a flow run
    held = Variable.get(name, default=None)
    if run_id and held and held.get("flow_run_id") == run_id:
        release_concurrency_slots_with_lease(uuid.UUID(held["lease_id"]))
        log(f"{stage}: released the lock an earlier, killed attempt of this flow run held")
    started = time.monotonic()
    holder = ConcurrencyLeaseHolder(type="flow_run", id=uuid.UUID(run_id)) if run_id else None
    # strict: a limit that vanished must not turn into no lock
    lease = acquire_concurrency_slots_with_lease([name], 1, lease_duration=LEASE_SECONDS, strict=True, holder=holder)
    Variable.set(name, {"lease_id": str(lease.lease_id), "flow_run_id": run_id}, overwrite=True)
    waited = time.monotonic() - started
    if waited >= 1.0:
        log(f"{stage}: waited {waited:.0f} s for another flow run building {output_uri} (limit {name})")
    try:
        # A lease renewal that fails (the API briefly away) must not kill hours of training: it warns, and at worst
        # two runs build one output, which stays consistent.
        with maintain_concurrency_lease(lease.lease_id, LEASE_SECONDS, raise_on_lease_renewal_failure=False):
            yield
    finally:
        # The record goes first, while the slot is still ours: the next holder, which may get the slot the moment
        # it is released, writes its own record then, and this unset must not delete that one (a concurrent run
        # failed on exactly that: its update found the record gone). (Not a later holder's record: checked.)
        if (Variable.get(name, default=None) or {}).get("lease_id") == str(lease.lease_id):
            Variable.unset(name)
        release_concurrency_slots_with_lease(lease.lease_id)
