"""Live migration of a running domain to another node's libvirtd, with its disks' top overlays
copied and their bases not (issue 12, docs to come in docs/migration.md).

Peer to peer: the source libvirtd opens the target's (``target_uri``) and drives both QEMUs.
Memory travels over ``migrate_uri`` and the overlays over NBD at ``disks_uri``; both may be
``unix://`` sockets (libvirt's migration "between two containers on the same host", and what a
TLS relay between agents will offer). The target's domain XML names the target's own paths:
the caller creates fresh, empty overlays there over the same bases (by digest) first, and
NON_SHARED_INC copies only what the overlays hold. On success the target holds the persistent
definition and the source none."""

import libvirt

from formation_vmm.agent.hypervisor.connection import Hypervisor, HypervisorError, hypervisor_error

FLAGS = (
    libvirt.VIR_MIGRATE_LIVE
    | libvirt.VIR_MIGRATE_PEER2PEER
    | libvirt.VIR_MIGRATE_PERSIST_DEST
    | libvirt.VIR_MIGRATE_UNDEFINE_SOURCE
    | libvirt.VIR_MIGRATE_NON_SHARED_INC
)


def migrate(
    hypervisor: Hypervisor,
    name: str,
    target_uri: str,
    target_xml: str,
    migrate_uri: str,
    disks_uri: str,
    disks: list[str],
    bandwidth_mib: int = 0,
) -> None:
    """Move the running domain ``name``; returns once it runs on the target (blocking: call it
    from a worker). ``disks`` are the targets (vda, ...) whose overlays are copied."""
    params: dict[str, object] = {
        libvirt.VIR_MIGRATE_PARAM_URI: migrate_uri,
        libvirt.VIR_MIGRATE_PARAM_DISKS_URI: disks_uri,
        libvirt.VIR_MIGRATE_PARAM_DEST_XML: target_xml,
        libvirt.VIR_MIGRATE_PARAM_PERSIST_XML: target_xml,
        libvirt.VIR_MIGRATE_PARAM_MIGRATE_DISKS: disks,
    }
    if bandwidth_mib:
        params[libvirt.VIR_MIGRATE_PARAM_BANDWIDTH] = bandwidth_mib
    dom = hypervisor.require(name)
    try:
        dom.migrateToURI3(target_uri, params, FLAGS)
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"migrating {name} to {target_uri}") from exc


def completed_job(hypervisor: Hypervisor, name: str) -> dict[str, int]:
    """The finished migration's figures on the target (milliseconds, bytes): time_elapsed,
    downtime, memory_total and the like, as libvirt reports them."""
    try:
        stats = hypervisor.require(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"the migration figures of {name}") from exc
    if not stats:
        raise HypervisorError(f"libvirt has no finished job for {name}")
    return {k: int(v) for k, v in stats.items() if isinstance(v, int)}


def migrating(hypervisor: Hypervisor, name: str) -> bool:
    """Whether the domain has a migration job in progress (on the source)."""
    try:
        job = int(hypervisor.require(name).jobInfo()[0])
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"the job of {name}") from exc
    return job != int(libvirt.VIR_DOMAIN_JOB_NONE)


def abort(hypervisor: Hypervisor, name: str) -> None:
    """Cancel the migration in progress: the domain runs on where it was, the target's half
    is torn down by libvirt."""
    try:
        hypervisor.require(name).abortJob()
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"cancelling the migration of {name}") from exc
