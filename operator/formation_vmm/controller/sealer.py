"""Hands each node the Secret values its VMs need, sealed to that node's agent (sealing.py):
a VM's cloud-init user data (``userDataSecretRef``) in ``status.sealedUserData``, a VmImage's
Authorization value (``secretRef``) in ``status.credentials``, one entry per node that fetches it
(the nodes of the VMs that use it, every hypervisor node for ``prefetch: AllNodes``). A live
migration's target gets its own: the user data in the VmMigration's ``status.sealedUserData``,
and an entry in the images' credentials, from Preparing on. Agents read no Secrets.

It reads the informers' stores (which objects need what, and each node's key) and keeps no copy
of its own: the informers tell it when what sealing reads of an object changed, and a pass
writes what is missing or stale (another node, a new key, a changed Secret). Passes run on change, and every
``refresh_seconds`` for Secrets changed behind our back. What a node gets (``sealed_for``) and
whether what it has will do (``unchanged``) are pure."""

import base64
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any

from formation_vmm.api.models import (
    SealedValue,
    VirtualMachine,
    VirtualMachineStatus,
    VmImage,
    VmImageStatus,
    VmMigration,
    VmMigrationStatus,
)
from formation_vmm.api.names import AGENT_KEY_ANNOTATION, IMAGE_KIND, MIGRATION_PLURAL, NODE_LABEL, VM_KIND
from formation_vmm.controller.vm_facts import BY_IMAGE, SEALING, node_of
from formation_vmm.informer import Informer
from formation_vmm.kube import ApiError, EventRecorder, Kube, NotFoundError, StatusWriter
from formation_vmm.migration_rules import SLOT_PHASES
from formation_vmm.sealing import image_context, key_id, seal, user_data_context

log = logging.getLogger(__name__)

Body = dict[str, Any]
Key = tuple[str, str]


Secret = tuple[bytes | None, str | None, str | None]  # (value, resourceVersion, why there is none)


def unchanged(have: SealedValue | None, want: SealedValue) -> bool:
    """Whether ``have`` already says what ``want`` does: sealed for the same node, to the same
    key, from the same version of the Secret (a fresh seal differs in every byte, so the data
    itself is not compared), or the same error."""
    return have is not None and (have.node, have.key_id, have.secret_version, have.error) == (
        want.node,
        want.key_id,
        want.secret_version,
        want.error,
    )


def sealed_for(node: str, public: str | None, secret: Secret, context: str) -> SealedValue:
    """The value for ``node``, sealed to its agent's key ``public``, or why there is none. Every
    field is set, None included: a status patch merges objects, so a field left unset would
    keep the previous seal's value (a stale error next to fresh data)."""
    value, version, error = secret
    if public is None:
        error, version = f"the agent of node {node} has not published its key yet", None
    if error is not None or value is None or public is None:
        return SealedValue(node=node, key_id=None, data=None, secret_version=version, error=error)
    return SealedValue(
        node=node,
        key_id=key_id(base64.b64decode(public)),
        data=seal(public, value, context),
        secret_version=version,
        error=None,
    )


@dataclass(frozen=True)
class Seen:
    """The informers whose stores the sealer reads: the VMs (vm_facts.py, indexed), the
    hypervisor Nodes (their agents' keys), the VmImages and the VmMigrations."""

    vms: Informer
    nodes: Informer
    images: Informer
    migrations: Informer


class Sealer:
    def __init__(
        self,
        kube: Kube,
        vms: StatusWriter[VirtualMachineStatus],
        images: StatusWriter[VmImageStatus],
        events: EventRecorder,
        seen: Seen,
        refresh_seconds: float = 60.0,
        migrations: StatusWriter[VmMigrationStatus] | None = None,
    ) -> None:
        self.kube = kube
        self.migration_writer = migrations or StatusWriter(kube, MIGRATION_PLURAL, VmMigrationStatus)
        self.vm_writer = vms
        self.image_writer = images
        self.events = events
        self.seen = seen
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._dirty = True
        self._last_full = 0.0

    # --- what the informers tell: a change of what sealing reads asks for a pass -------------
    # (an agent's status write, every few seconds per VM, does not)

    def _changed(self, before: object, after: object) -> None:
        if before != after:
            with self._lock:
                self._dirty = True

    def node_changed(self, old: Body | None, new: Body | None) -> None:
        self._changed(_agent_key(old), _agent_key(new))

    def vm_changed(self, old: Body | None, new: Body | None) -> None:
        self._changed(_vm_print(old), _vm_print(new))

    def migration_changed(self, old: Body | None, new: Body | None) -> None:
        self._changed(_migration_print(old), _migration_print(new))

    def image_changed(self, old: Body | None, new: Body | None) -> None:
        self._changed(_image_print(old), _image_print(new))

    # --- what the stores hold ----------------------------------------------------------------

    def _keys(self) -> dict[str, str]:
        """Each hypervisor node's agent's public key (base64), as its Node says."""
        keys = {}
        for node in self.seen.nodes.store.items():
            key = _agent_key(node)
            if key:
                keys[str(node["metadata"]["name"])] = key
        return keys

    def _incoming(self) -> list[Body]:
        """Migrations under way (Preparing, Migrating): their target fetches the VM's images
        and builds its seed before the binding moves (docs/migration.md)."""
        return [m for m in self.seen.migrations.store.items() if _migration_print(m) is not None]

    def _images(self) -> list[Body]:
        return [i for i in self.seen.images.store.items() if _image_print(i) is not None]

    # --- decisions ---------------------------------------------------------------------------

    def nodes_fetching(self, image: VmImage) -> set[str]:
        """The nodes that fetch ``image``: those of the VMs that name it, every node with a key
        for ``prefetch: AllNodes``."""
        if image.spec.prefetch == "AllNodes":
            return set(self._keys())
        namespace = image.metadata.namespace or ""
        users = {
            str(facts["metadata"].get("name")): node
            for facts in self.seen.vms.by(BY_IMAGE, (namespace, image.metadata.name))
            if (node := node_of(facts)) is not None
        }
        # A migration's target fetches the VM's images before the VM is bound there.
        targets = {
            str(m["status"]["targetNode"])
            for m in self._incoming()
            if m["metadata"].get("namespace") == namespace and (m.get("spec") or {}).get("vmName") in users
        }
        return set(users.values()) | targets

    # --- passes ------------------------------------------------------------------------------

    def pass_once(self, now: float | None = None) -> None:
        moment = time.monotonic() if now is None else now
        with self._lock:
            full = moment - self._last_full >= self.refresh_seconds
            if not (self._dirty or full):
                return
            self._dirty = False
            if full:
                self._last_full = moment
        vms = self.seen.vms.by(SEALING, True)
        images = self._images()
        keys = self._keys()
        incoming = self._incoming()
        by_name = {(b["metadata"]["namespace"], b["metadata"]["name"]): b for b in vms}
        secrets: dict[Key, Body | None] = {}  # each Secret read once per pass, however many use it
        for body in vms:
            try:
                self._seal_user_data(body, keys, secrets)
            except ApiError as exc:
                log.warning("cannot seal the user data of %s: %s", body["metadata"]["name"], exc)
        for mig in incoming:
            vm_body = by_name.get(
                (mig["metadata"].get("namespace", ""), (mig.get("spec") or {}).get("vmName"))
            )
            if vm_body is None:
                continue  # its VM has no userDataSecretRef
            try:
                self._seal_for_target(mig, vm_body, keys, secrets)
            except ApiError as exc:
                log.warning(
                    "cannot seal the user data of %s for its target: %s", mig["metadata"]["name"], exc
                )
        for body in images:
            try:
                self._seal_credentials(body, keys, secrets)
            except ApiError as exc:
                log.warning("cannot seal the credentials of %s: %s", body["metadata"]["name"], exc)

    def _secret(self, namespace: str, name: str, key: str, read: dict[Key, Body | None]) -> Secret:
        if (namespace, name) not in read:
            try:
                read[namespace, name] = self.kube.secret(namespace, name)
            except NotFoundError:
                read[namespace, name] = None
        secret = read[namespace, name]
        if secret is None:
            return None, None, f"Secret {namespace}/{name} does not exist"
        encoded = (secret.get("data") or {}).get(key)
        version = str(secret.get("metadata", {}).get("resourceVersion") or "")
        if encoded is None:
            return None, version, f"Secret {namespace}/{name} has no key {key!r}"
        return base64.b64decode(encoded), version, None

    def _user_data_for(
        self, vm: VirtualMachine, node: str, keys: dict[str, str], secrets: dict[Key, Body | None]
    ) -> SealedValue | None:
        """The VM's user data sealed for ``node``; None when it names no Secret."""
        ref = vm.spec.cloud_init.user_data_secret_ref if vm.spec.cloud_init else None
        if ref is None:
            return None
        namespace = vm.metadata.namespace or ""
        context = user_data_context(namespace, vm.metadata.name, vm.metadata.uid or "", ref.name, ref.key)
        return sealed_for(node, keys.get(node), self._secret(namespace, ref.name, ref.key, secrets), context)

    def _seal_for_target(
        self, mig_body: Body, vm_body: Body, keys: dict[str, str], secrets: dict[Key, Body | None]
    ) -> None:
        mig = VmMigration.model_validate(mig_body)
        target = mig.status.target_node or ""
        sealed = self._user_data_for(VirtualMachine.model_validate(vm_body), target, keys, secrets)
        if sealed is None or unchanged(mig.status.sealed_user_data, sealed):
            return
        self.migration_writer.write(
            mig_body,
            lambda _: VmMigrationStatus(sealed_user_data=sealed),
            guard=lambda b: (b.get("status") or {}).get("phase") in SLOT_PHASES,
        )

    def _seal_user_data(self, body: Body, keys: dict[str, str], secrets: dict[Key, Body | None]) -> None:
        vm = VirtualMachine.model_validate(body)
        node = vm.metadata.labels.get(NODE_LABEL)
        if node is None:
            return
        sealed = self._user_data_for(vm, node, keys, secrets)
        if sealed is None or unchanged(vm.status.sealed_user_data, sealed):
            return  # sealed already, to the same key, from the same Secret version
        self.vm_writer.write(body, lambda _: VirtualMachineStatus(sealed_user_data=sealed))
        if sealed.error:
            self.events.post(body, VM_KIND, "SecretNotSealed", sealed.error, "Warning")

    def _seal_credentials(self, body: Body, keys: dict[str, str], secrets: dict[Key, Body | None]) -> None:
        image = VmImage.model_validate(body)
        http = image.spec.source.http
        ref = http.secret_ref if http is not None else None
        if ref is None:
            return
        namespace = image.metadata.namespace or ""
        context = image_context(namespace, image.metadata.name, image.metadata.uid or "", ref.name, ref.key)
        secret = self._secret(namespace, ref.name, ref.key, secrets)
        have = {entry.node: entry for entry in image.status.credentials}
        entries = []
        for node in sorted(self.nodes_fetching(image)):
            sealed = sealed_for(node, keys.get(node), secret, context)
            entries.append(have[node] if unchanged(have.get(node), sealed) else sealed)
        if entries == image.status.credentials:
            return
        self.image_writer.write(body, lambda _: VmImageStatus(credentials=entries))
        for entry in entries:
            if entry.error and not unchanged(have.get(entry.node), entry):
                self.events.post(
                    body, IMAGE_KIND, "SecretNotSealed", f"{entry.node}: {entry.error}", "Warning"
                )


def _agent_key(node: Body | None) -> str | None:
    return ((node or {}).get("metadata", {}).get("annotations") or {}).get(AGENT_KEY_ANNOTATION) or None


def _vm_print(facts: Body | None) -> tuple[Any, ...] | None:
    """What sealing reads of a VM (vm_facts.py); None for one it has nothing to do with."""
    if facts is None or facts["metadata"].get("deletionTimestamp") or node_of(facts) is None:
        return None
    ref = ((facts.get("spec") or {}).get("cloudInit") or {}).get("userDataSecretRef")
    sealed = (facts.get("status") or {}).get("sealedUserData")
    return (node_of(facts), tuple(facts.get("images") or ()), repr(ref), repr(sealed))


def _migration_print(body: Body | None) -> tuple[Any, ...] | None:
    status = (body or {}).get("status") or {}
    if status.get("phase") not in SLOT_PHASES or not status.get("targetNode"):
        return None
    return (status.get("targetNode"), repr(status.get("sealedUserData")))


def _image_print(body: Body | None) -> tuple[Any, ...] | None:
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    spec = body.get("spec") or {}
    ref = ((spec.get("source") or {}).get("http") or {}).get("secretRef")
    if not ref:
        return None
    return (repr(ref), spec.get("prefetch"), repr((body.get("status") or {}).get("credentials")))
