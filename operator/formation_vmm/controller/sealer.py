"""Hands each node the Secret values its VMs need, sealed to that node's agent (sealing.py):
a VM's cloud-init user data (``userDataSecretRef``) in ``status.sealedUserData``, a VmImage's
Authorization value (``secretRef``) in ``status.credentials``, one entry per node that fetches it
(the nodes of the VMs that use it, every hypervisor node for ``prefetch: AllNodes``). A live
migration's target gets its own: the user data in the VmMigration's ``status.sealedUserData``,
and an entry in the images' credentials, from Preparing on. Agents read no Secrets.

Fed by the watches (which objects need what, and each node's key); a pass writes what is missing
or stale (another node, a new key, a changed Secret). Passes run on change, and every
``refresh_seconds`` for Secrets changed behind our back. What a node gets (``sealed_for``) and
whether what it has will do (``unchanged``) are pure."""

import base64
import logging
import threading
import time
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
from formation_vmm.api.references import referenced_images
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


class Sealer:
    def __init__(
        self,
        kube: Kube,
        vms: StatusWriter[VirtualMachineStatus],
        images: StatusWriter[VmImageStatus],
        events: EventRecorder,
        refresh_seconds: float = 60.0,
        migrations: StatusWriter[VmMigrationStatus] | None = None,
    ) -> None:
        self.kube = kube
        self.migration_writer = migrations or StatusWriter(kube, MIGRATION_PLURAL, VmMigrationStatus)
        self.vm_writer = vms
        self.image_writer = images
        self.events = events
        self.refresh_seconds = refresh_seconds
        self._lock = threading.Lock()
        self._keys: dict[str, str] = {}  # node -> its agent's public key (base64)
        self._vms: dict[str, Body] = {}  # uid -> bound VM with a userDataSecretRef
        # uid -> (namespace, node, images named, name)
        self._bound: dict[str, tuple[str, str, set[str], str]] = {}
        self._images: dict[Key, Body] = {}  # VmImages with a secretRef
        # Migrations under way (Preparing, Migrating): uid -> body. Their target fetches the
        # VM's images and builds its seed before the binding moves (docs/migration.md).
        self._incoming: dict[str, Body] = {}
        # What sealing reads of each VM and image, as last seen: only a change there asks for a
        # pass (a status write of the agents, every few seconds per VM, does not).
        self._seen: dict[str | Key, Any] = {}
        self._dirty = True
        self._last_full = 0.0

    # --- what the watches tell --------------------------------------------------------------

    def node_event(self, event_type: str | None, summary: dict[str, Any]) -> None:
        key = (summary.get("annotations") or {}).get(AGENT_KEY_ANNOTATION)
        with self._lock:
            if event_type == "DELETED" or not key:
                changed = self._keys.pop(summary["name"], None) is not None
            else:
                changed = self._keys.get(summary["name"]) != key
                self._keys[summary["name"]] = key
            self._dirty |= changed

    def vm_event(self, event_type: str | None, body: Body) -> None:
        meta = body["metadata"]
        uid = meta.get("uid", "")
        node = (meta.get("labels") or {}).get(NODE_LABEL)
        with self._lock:
            if event_type == "DELETED" or not node or meta.get("deletionTimestamp"):
                self._vms.pop(uid, None)
                self._bound.pop(uid, None)
                self._seen.pop(uid, None)
                return
            images = referenced_images(body)
            self._bound[uid] = (meta["namespace"], node, images, meta.get("name", ""))
            ref = ((body.get("spec") or {}).get("cloudInit") or {}).get("userDataSecretRef")
            if ref:
                self._vms[uid] = body
            else:
                self._vms.pop(uid, None)
            seen = (node, sorted(images), ref, (body.get("status") or {}).get("sealedUserData"))
            if self._seen.get(uid) != seen:
                self._seen[uid] = seen
                self._dirty = True

    def migration_event(self, event_type: str | None, body: Body) -> None:
        uid = body["metadata"].get("uid", "")
        status = body.get("status") or {}
        with self._lock:
            if (
                event_type == "DELETED"
                or status.get("phase") not in SLOT_PHASES
                or not status.get("targetNode")
            ):
                self._incoming.pop(uid, None)
                self._seen.pop(uid, None)
                return
            self._incoming[uid] = body
            seen = (status.get("targetNode"), status.get("sealedUserData"))
            if self._seen.get(uid) != seen:
                self._seen[uid] = seen
                self._dirty = True

    def image_event(self, event_type: str | None, body: Body) -> None:
        meta = body["metadata"]
        key = (meta["namespace"], meta["name"])
        source = ((body.get("spec") or {}).get("source") or {}).get("http") or {}
        with self._lock:
            if event_type == "DELETED" or not source.get("secretRef") or meta.get("deletionTimestamp"):
                self._images.pop(key, None)
                self._seen.pop(key, None)
            else:
                self._images[key] = body
                spec = body.get("spec") or {}
                seen = (
                    source["secretRef"],
                    spec.get("prefetch"),
                    (body.get("status") or {}).get("credentials"),
                )
                if self._seen.get(key) != seen:
                    self._seen[key] = seen
                    self._dirty = True

    # --- decisions ---------------------------------------------------------------------------

    def nodes_fetching(self, image: VmImage) -> set[str]:
        """The nodes that fetch ``image``: those of the VMs that name it, every node with a key
        for ``prefetch: AllNodes``."""
        with self._lock:
            if image.spec.prefetch == "AllNodes":
                return set(self._keys)
            namespace = image.metadata.namespace
            users = {
                name: node
                for ns, node, names, name in self._bound.values()
                if ns == namespace and image.metadata.name in names
            }
            # A migration's target fetches the VM's images before the VM is bound there.
            targets = {
                str(m["status"]["targetNode"])
                for m in self._incoming.values()
                if m["metadata"].get("namespace") == namespace
                and (m.get("spec") or {}).get("vmName") in users
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
            vms = list(self._vms.values())
            images = list(self._images.values())
            keys = dict(self._keys)
            incoming = list(self._incoming.values())
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
