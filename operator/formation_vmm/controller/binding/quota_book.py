"""The binder's quota collaborator: each namespace's ResourceQuotas (our resource names in
``spec.hard``, quota.py) and what counts against them, kept as running sums: the bound VMs'
admitted sizes and the Ready VmSnapshots' bytes (as disk). Pure and not locked: the binder
calls it under its own lock, so a decision and the room it takes are one step."""

from typing import Any

from formation_vmm.quota import Quota, Usage, quota_of, refusal

Body = dict[str, Any]


class QuotaBook:
    def __init__(self) -> None:
        self._quotas: dict[tuple[str, str], Quota] = {}  # (namespace, ResourceQuota) -> limits
        self._vms: dict[str, Usage] = {}  # namespace -> its bound VMs' sum
        # Ready snapshots' bytes: uid -> (namespace, bytes), and the sums per namespace.
        self._snapshots: dict[str, tuple[str, int]] = {}
        self._snapshot_bytes: dict[str, int] = {}

    def quota_event(self, event_type: str | None, body: Body) -> None:
        meta = body["metadata"]
        key = (str(meta.get("namespace", "")), str(meta.get("name", "")))
        if event_type == "DELETED":
            self._quotas.pop(key, None)
        else:
            self._quotas[key] = quota_of(key[1], dict((body.get("spec") or {}).get("hard") or {}))

    def snapshot_event(self, event_type: str | None, body: Body) -> bool:
        """A VmSnapshot's bytes (``status.size`` once Ready) in its namespace's disk; returns
        whether disk came free (a VM waiting on the quota may fit now)."""
        meta = body["metadata"]
        uid = str(meta.get("uid", ""))
        status = body.get("status") or {}
        size = status.get("size") if status.get("phase") == "Ready" else None
        counted = (str(meta.get("namespace", "")), size if isinstance(size, int) and size > 0 else 0)
        old = self._snapshots.pop(uid, None)
        if old is not None:
            self._snapshot_bytes[old[0]] -= old[1]
        if event_type != "DELETED" and counted[1]:
            self._snapshots[uid] = counted
            self._snapshot_bytes[counted[0]] = self._snapshot_bytes.get(counted[0], 0) + counted[1]
        return old is not None and (event_type == "DELETED" or counted[1] < old[1])

    def charge(self, namespace: str, usage: Usage) -> None:
        self._vms[namespace] = self._vms.get(namespace, Usage()) + usage

    def refund(self, namespace: str, usage: Usage) -> None:
        self._vms[namespace] = self._vms.get(namespace, Usage()) - usage

    def used(self, namespace: str) -> Usage:
        """What the namespace's quotas count as used: its bound VMs and its snapshots' bytes."""
        return self._vms.get(namespace, Usage()) + Usage(disk=self._snapshot_bytes.get(namespace, 0))

    def quotas(self, namespace: str) -> list[Quota]:
        return [quota for (ns, _), quota in self._quotas.items() if ns == namespace]

    def refusal(self, namespace: str, wanted: Usage) -> str | None:
        """Why ``wanted`` more would take the namespace past a quota, or None."""
        quotas = self.quotas(namespace)
        return refusal(quotas, self.used(namespace), wanted) if quotas else None
