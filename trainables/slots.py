"""At most N trials of a study train at once, whatever Tune starts.

Tune applies ``max_concurrent_trials`` only to the trials it creates: a restored study starts all
its unfinished trials together, and on a small machine they starve each other of the CPUs Ray
Data needs. A trial's driver holds no CPU, so all of them can start; each then waits here for one
of N slots before it reads data or starts its workers. A slot is a lease the holder renews while
it trains, so a trial whose process died frees its slot without anyone releasing it.
"""

from __future__ import annotations

import contextlib
import threading
import time

import ray

LEASE_SECONDS = 60.0
RENEW_SECONDS = 10.0
POLL_SECONDS = 2.0


@ray.remote(num_cpus=0)
class TrialSlots:
    def __init__(self, limit: int, lease_seconds: float = LEASE_SECONDS):
        self.limit = limit
        self.lease_seconds = lease_seconds
        self.leases: dict[str, float] = {}  # holder -> lease end (monotonic)

    def acquire(self, holder: str) -> bool:
        """Take (or keep: a restarted trial keeps its id) a slot; False if none is free."""
        now = time.monotonic()
        self.leases = {h: end for h, end in self.leases.items() if end > now}
        if holder in self.leases or len(self.leases) < self.limit:
            self.leases[holder] = now + self.lease_seconds
            return True
        return False

    def renew(self, holder: str) -> None:
        if holder in self.leases:
            self.leases[holder] = time.monotonic() + self.lease_seconds

    def release(self, holder: str) -> None:
        self.leases.pop(holder, None)

    def holders(self) -> list[str]:
        return sorted(self.leases)


@contextlib.contextmanager
def trial_slot(slots, holder: str, poll_seconds: float = POLL_SECONDS):
    """Hold one of ``slots`` (a TrialSlots handle; None: no limit) for the ``with`` block."""
    if slots is None:
        yield
        return
    waited = False
    while not ray.get(slots.acquire.remote(holder)):
        if not waited:
            print(f"{holder}: waiting for a free trial slot", flush=True)
            waited = True
        time.sleep(poll_seconds)
    stop = threading.Event()

    def keep_lease() -> None:
        while not stop.wait(RENEW_SECONDS):
            slots.renew.remote(holder)

    renewer = threading.Thread(target=keep_lease, daemon=True)
    renewer.start()
    try:
        yield
    finally:
        stop.set()
        ray.get(slots.release.remote(holder))
