"""This node as a migration's target (docs/migration.md): it prepares the VM's files and a
stopped definition of its domain under the source's UUID, and removes them again when the
migration ends without arriving."""

import logging

from formation_vmm.agent.hypervisor import HypervisorError
from formation_vmm.agent.migration.migration_work import (
    RETRY_SECONDS,
    Body,
    MigrationError,
    MigrationWork,
    phase_of,
    target_of,
)
from formation_vmm.agent.vms.inputs import InputNotReadyError
from formation_vmm.agent.vms.migration_marks import Mark
from formation_vmm.api.admission import change_held
from formation_vmm.api.models import (
    VirtualMachine,
    VmMigration,
    VmMigrationStatus,
)
from formation_vmm.api.names import VM_PLURAL
from formation_vmm.domain.naming import domain_name

log = logging.getLogger(__name__)


class IncomingMigrations(MigrationWork):
    def _prepare(self, body: Body) -> float | None:
        """Returns when to look again (a base still being fetched)."""
        fresh = self._fresh(body, "Preparing", "targetNode")
        if fresh is None:
            return None
        body = fresh
        mig = VmMigration.model_validate(body)
        namespace, uid = mig.metadata.namespace or "", mig.metadata.uid or ""
        vm_body = self.kube.get_or_none(VM_PLURAL, namespace, mig.spec.vm_name)
        if vm_body is None:
            self._fail(body, "VmNotFound", f"VM {mig.spec.vm_name} is gone")
            return None
        vm = VirtualMachine.model_validate(vm_body)
        if change_held(vm.metadata.annotations, vm.spec):
            # The target would define the domain from a spec the controller has not admitted.
            self._fail(body, "ChangeHeld", f"VM {vm.metadata.name} has a spec change that is not admitted")
            return None
        uuid = vm.status.domain_uuid
        if not uuid:
            self._fail(body, "NoDomain", f"VM {vm.metadata.name} has no domain on its node to move")
            return None
        if mig.status.sealed_user_data is not None:
            # The VM's own copy is sealed for its node, the source: the controller sealed one
            # for this node in the migration (controller/sealer.py). The seed is built from it.
            status = vm.status.model_copy(update={"sealed_user_data": mig.status.sealed_user_data})
            vm = vm.model_copy(update={"status": status})
        self.marks.set(Mark(vm.metadata.uid or "", "in", uid, namespace, vm.metadata.name, mig.metadata.name))
        dom = domain_name(namespace, vm.metadata.name)
        try:
            with self.sync.locked(dom):
                current = self.hypervisor.describe(dom)
                if current is not None and current.actual.active:
                    raise MigrationError("TargetBusy", f"a domain named {dom} runs on {self.node} already")
                if current is not None:
                    self.hypervisor.undefine(dom)
                self.reconciler.prepare_incoming(vm, uuid)
                if self.relay is not None:
                    self.relay.incoming(uid, self.reconciler.qemu_owner(vm))  # its QEMU makes sockets there
        except InputNotReadyError as exc:
            log.info("migration %s/%s waits on the target: %s", namespace, mig.metadata.name, exc)
            return RETRY_SECONDS
        except (MigrationError, HypervisorError, OSError, ValueError) as exc:
            reason = exc.reason if isinstance(exc, MigrationError) else "TargetFailed"
            self._fail(body, reason, f"preparing node {self.node}: {exc}")
            return None
        self.migrations.write(
            body,
            lambda _: VmMigrationStatus(phase="Migrating", message=f"node {self.node} is ready"),
            guard=lambda b: phase_of(b) == "Preparing" and target_of(b) == self.node,
        )
        return None

    def _abandon_incoming(self, body: Body, mark: Mark | None = None) -> float | None:
        """A migration to here that did not happen: its prepared domain and files go, unless the
        VM is bound here after all (then they are its own). Returns when to try again (libvirtd
        away)."""
        uid = body["metadata"].get("uid", "")
        if self.relay is not None:
            self.relay.forget(uid)
        marks = self.marks.of_migration(uid, "in")
        for held in marks if mark is None else [mark]:
            vm_body = self._bound_here(held.namespace, held.vm_name)
            if vm_body is not None and vm_body["metadata"].get("uid") == held.vm_uid:
                self.marks.clear(held.vm_uid, uid)  # it arrived: its sync owns it now
                continue
            try:
                self._remove_prepared(held)
            except HypervisorError as exc:
                # libvirtd is away (it may have died mid-copy): looked at again until it is back.
                log.warning(
                    "cannot remove what was prepared for %s/%s yet: %s", held.namespace, held.vm_name, exc
                )
                return RETRY_SECONDS
            self.marks.clear(held.vm_uid, uid)
        return None

    def _remove_prepared(self, mark: Mark) -> None:
        for info in self.hypervisor.owned_domains():
            owner = info.owner
            if owner is None or owner.uid != mark.vm_uid:
                continue
            with self.sync.locked(info.name):
                if info.actual.active:
                    # A guest runs here for a VM bound elsewhere: never removed by a guess.
                    log.warning("domain %s runs here though its migration did not end here", info.name)
                    return
                self.hypervisor.undefine(info.name)
                ghost = VirtualMachine.model_validate(
                    {"metadata": {"namespace": owner.namespace, "name": owner.name, "uid": owner.uid}}
                )
                self.reconciler.remove_files(ghost)
            log.info("removed what node %s prepared for %s/%s", self.node, owner.namespace, owner.name)

    def _arrived(self, body: Body) -> None:
        uid = body["metadata"].get("uid", "")
        if self.relay is not None:
            self.relay.forget(uid)
        for mark in self.marks.of_migration(uid):
            self.marks.clear(mark.vm_uid, uid)
            self.poke(domain_name(mark.namespace, mark.vm_name))
