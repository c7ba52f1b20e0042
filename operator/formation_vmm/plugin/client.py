"""What every verb of ``kubectl vm`` shares: the API client for one namespace, waits, tables."""

import os
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from formation_vmm.api.models import VirtualMachine
from formation_vmm.api.names import (
    API_VERSION,
    VM_PLURAL,
)
from formation_vmm.kube import ApiError, Kube, NotFoundError, kubeconfig_namespace, load_config

Check = Callable[[VirtualMachine], bool]


class PluginError(RuntimeError):
    pass


class Vms:
    def __init__(self, kubeconfig: str | None, context: str | None, namespace: str | None) -> None:
        load_config(kubeconfig or _default_kubeconfig(), context)
        self.namespace = namespace or kubeconfig_namespace(kubeconfig)
        self.kube = Kube(user_agent="kubectl-vm")

    def get(self, name: str) -> VirtualMachine:
        try:
            return VirtualMachine.model_validate(self.kube.get(VM_PLURAL, self.namespace, name))
        except NotFoundError as exc:
            raise PluginError(f"virtualmachine {self.namespace}/{name} not found") from exc

    def list(self) -> list[VirtualMachine]:
        return [VirtualMachine.model_validate(item) for item in self.kube.list(VM_PLURAL, self.namespace)]

    def patch_spec(self, name: str, spec: dict[str, Any]) -> None:
        self.kube.patch(VM_PLURAL, self.namespace, name, {"spec": spec})

    def create(
        self, plural: str, kind: str, spec: dict[str, Any], *, name: str = "", prefix: str = ""
    ) -> str:
        """Create the object and return its name: ``name`` as given, else ``prefix`` and a suffix the
        apiserver picks (``generateName``), so two made in the same second never collide."""
        metadata = {"name": name} if name else {"generateName": prefix}
        body = {"apiVersion": API_VERSION, "kind": kind, "metadata": metadata, "spec": spec}
        try:
            return str(self.kube.create(plural, self.namespace, body)["metadata"]["name"])
        except ApiError as exc:
            if exc.status in (409, 422):  # exists already, or refused by the schema: say why
                raise PluginError(f"{kind} {name or prefix}: {exc}") from exc
            raise

    def wait_done(self, plural: str, name: str, done: set[str], timeout: float) -> dict[str, Any]:
        """The object once its status.phase is one of ``done``."""
        deadline = time.monotonic() + timeout
        while True:
            raw = self.kube.get(plural, self.namespace, name)
            status = raw.get("status") or {}
            if status.get("phase") in done:
                return dict(raw)
            if time.monotonic() > deadline:
                note = f": {status['error']}" if status.get("error") else ""
                phase = status.get("phase") or "new"
                raise PluginError(f"timed out after {timeout:.0f}s waiting for {name}; it is {phase}{note}")
            time.sleep(0.3)

    def wait(self, name: str, check: Check, what: str, timeout: float) -> VirtualMachine:
        deadline = time.monotonic() + timeout
        while True:
            vm = self.get(name)
            if check(vm):
                return vm
            if time.monotonic() > deadline:
                raise PluginError(
                    f"timed out after {timeout:.0f}s waiting for {name} to be {what}; "
                    f"it is {vm.status.phase or 'new'}: {vm.status.message or ''}"
                )
            time.sleep(0.3)


def utc_now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


def table(rows: list[list[str]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows
    )


def stamp() -> str:
    return utc_now().strftime("%Y%m%d-%H%M%S")


def _default_kubeconfig() -> str | None:
    """$KUBECONFIG's first file, else kubectl's default; None lets a pod use its token."""
    path = os.environ.get("KUBECONFIG", "").split(os.pathsep)[0] or os.path.expanduser("~/.kube/config")
    return path if os.path.exists(path) else None
