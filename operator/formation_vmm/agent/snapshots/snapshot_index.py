"""How many VmSnapshots each VM has, as the agent's snapshot watch shows them: a VM with any
cannot move live (its LiveMigratable condition says so; the controller refuses the same VMs
by the same count, controller/migrations.snapshot_counts)."""

import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

Body = dict[str, Any]


class SnapshotIndex:
    def __init__(self) -> None:
        self._of: dict[tuple[str, str], str] = {}  # (namespace, snapshot) -> its VM's name
        self._counts: Counter[tuple[str, str]] = Counter()  # (namespace, VM) -> snapshots
        self._lock = threading.Lock()

    def load(self, bodies: Iterable[Body]) -> None:
        """The snapshots as a list shows them, before the watch brings their changes: a VM's
        first sync after a restart then already counts them (no True written, then False)."""
        for body in bodies:
            self.observe(None, body)

    def observe(self, event_type: str | None, body: Body) -> tuple[str, str] | None:
        """Take a watch event in; returns (namespace, VM) when that VM's count changed."""
        meta = body["metadata"]
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        # One being deleted no longer counts (its data goes with it), as for the controller.
        present = event_type != "DELETED" and not meta.get("deletionTimestamp")
        vm = str((body.get("spec") or {}).get("vmName", ""))
        with self._lock:
            held = self._of.get(key)
            if present and held == vm:
                return None
            if held is not None:
                self._drop(key, held)
            if present:
                self._of[key] = vm
                self._counts[key[0], vm] += 1
            changed = vm if present else held
        return None if changed is None else (key[0], changed)

    def _drop(self, key: tuple[str, str], vm: str) -> None:
        del self._of[key]
        self._counts[key[0], vm] -= 1
        if self._counts[key[0], vm] <= 0:
            del self._counts[key[0], vm]

    def count(self, namespace: str, vm: str) -> int:
        with self._lock:
            return self._counts.get((namespace, vm), 0)
