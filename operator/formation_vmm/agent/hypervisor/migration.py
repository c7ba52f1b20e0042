"""Live migration of a running domain to another node's libvirtd, with its disks' top overlays
copied and their bases not (docs/migration.md).

Peer to peer: the source libvirtd opens the target's (``target_uri``) and drives both QEMUs.
Memory travels over ``migrate_uri`` and the overlays over NBD at ``disks_uri``; both may be
``unix://`` sockets (libvirt's migration "between two containers on the same host", and what a
TLS relay between agents will offer). The target's domain XML names the target's own paths:
the caller creates fresh, empty overlays there over the same bases (by digest) first, and
NON_SHARED_INC copies only what the overlays hold. On success the target holds the persistent
definition and the source none."""

import contextlib
import xml.etree.ElementTree as ET
from collections.abc import Iterator

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
    auto_converge: bool = False,
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
    flags = FLAGS | (libvirt.VIR_MIGRATE_AUTO_CONVERGE if auto_converge else 0)
    dom = hypervisor.require(name)
    try:
        dom.migrateToURI3(target_uri, params, flags)
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
    return _figures(stats)


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


def progress(hypervisor: Hypervisor, name: str) -> dict[str, int]:
    """The running migration's figures on the source (bytes, bytes per second): memory_total,
    memory_remaining, disk_total, disk_remaining, memory_bps; empty when no job runs."""
    try:
        stats = hypervisor.require(name).jobStats()
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"the migration progress of {name}") from exc
    if int(stats.get("type", libvirt.VIR_DOMAIN_JOB_NONE)) == libvirt.VIR_DOMAIN_JOB_NONE:
        return {}
    return _figures(stats)


def target_definition(target_uri: str, name: str) -> str:
    """The domain the target's agent defined for the incoming VM (its own paths, its own
    seed), as libvirt would migrate it: the XML the source hands libvirt for the target. Read
    from the target's libvirtd, which the source's libvirtd opens anyway (PEER2PEER)."""
    with _target(target_uri) as conn:
        try:
            return str(conn.lookupByName(name).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"reading the target's definition of {name}") from exc


def own_definition(hypervisor: Hypervisor, name: str) -> str:
    """This node's definition of the incoming domain ``name``, as a migration carries it: what
    the relay puts in a source's Prepare and Finish in place of what it sent."""
    try:
        return str(hypervisor.require(name).XMLDesc(libvirt.VIR_DOMAIN_XML_MIGRATABLE))
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"reading the definition of {name}") from exc


def runs_on(target_uri: str, name: str, uuid: str) -> bool:
    """Whether the target's libvirtd runs the domain ``name`` with this UUID (a source agent that
    restarted mid-migration asks where its guest went)."""
    with _target(target_uri) as conn:
        try:
            dom = conn.lookupByName(name)
            return bool(dom.isActive()) and dom.UUIDString() == uuid
        except libvirt.libvirtError as exc:
            if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
                return False
            raise hypervisor_error(exc, f"looking for {name} on the target") from exc


def completed_job_on(target_uri: str, name: str) -> dict[str, int]:
    """``completed_job`` read from the target's libvirtd, by the source's agent."""
    with _target(target_uri) as conn:
        try:
            stats = conn.lookupByName(name).jobStats(libvirt.VIR_DOMAIN_JOB_STATS_COMPLETED)
        except libvirt.libvirtError as exc:
            raise hypervisor_error(exc, f"the migration figures of {name}") from exc
    return _figures(stats or {})


def writable_disks(domain_xml: str) -> list[str]:
    """The target devices (vda, ...) of the domain's writable disks: the ones whose top image
    the migration copies (a cloud-init seed is a read-only CD the target makes itself)."""
    root = ET.fromstring(domain_xml)  # noqa: S314 - the XML of our own domain, from libvirt
    devices = []
    for disk in root.iterfind("./devices/disk"):
        if disk.get("device", "disk") != "disk" or disk.find("readonly") is not None:
            continue
        target = disk.find("target")
        if target is not None and target.get("dev"):
            devices.append(str(target.get("dev")))
    return devices


def _figures(stats: dict[str, object]) -> dict[str, int]:
    """The numbers of libvirt's job statistics."""
    return {k: int(v) for k, v in stats.items() if isinstance(v, int)}


@contextlib.contextmanager
def _target(target_uri: str) -> Iterator[libvirt.virConnect]:
    """A short connection of the source's agent to the target's libvirtd, closed after use."""
    try:
        conn = libvirt.open(target_uri)
    except libvirt.libvirtError as exc:
        raise hypervisor_error(exc, f"opening the target's libvirt {target_uri}") from exc
    try:
        yield conn
    finally:
        conn.close()
