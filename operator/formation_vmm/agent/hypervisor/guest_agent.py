"""The QEMU guest agent of a domain, through libvirt (its virtio-serial channel
``org.qemu.guest_agent.0``, which every domain has)."""

import json

import libvirt
import libvirt_qemu  # ships with libvirt-python

from formation_vmm.agent.hypervisor.connection import Hypervisor
from formation_vmm.api.models import GUEST_INFO_MAX, GuestOSInfo


def guest_ping(hypervisor: Hypervisor, name: str, timeout: float) -> str | None:
    """None when the domain's guest agent answers ``guest-ping`` within ``timeout``, else why not."""
    dom = hypervisor.lookup(name)
    if dom is None:
        return f"domain {name} does not exist"
    try:
        answer = libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": "guest-ping"}), max(int(timeout), 1), 0
        )
    except libvirt.libvirtError as exc:
        return f"the guest agent does not answer: {exc.get_error_message() or exc}"
    if answer is None or "return" not in json.loads(answer):
        return f"the guest agent answered {answer!r}"
    return None


# guest-get-osinfo's keys, as the status spells them.
_OS_INFO_KEYS = {
    "name": "name",
    "version": "version",
    "version-id": "versionId",
    "id": "id",
    "pretty-name": "prettyName",
    "kernel-release": "kernelRelease",
    "kernel-version": "kernelVersion",
    "machine": "machine",
}


def os_info_of(answer: str) -> GuestOSInfo | None:
    """The status's guestOSInfo from a guest-get-osinfo answer; None for anything else. The
    guest is untrusted: only the known keys, only strings, each cut to GUEST_INFO_MAX."""
    try:
        reply = json.loads(answer)
    except ValueError:
        return None
    info = reply.get("return") if isinstance(reply, dict) else None
    if not isinstance(info, dict):
        return None
    fields = {
        ours: value[:GUEST_INFO_MAX]
        for theirs, ours in _OS_INFO_KEYS.items()
        if isinstance(value := info.get(theirs), str)
    }
    return GuestOSInfo.model_validate(fields) if fields else None


def guest_os_info(hypervisor: Hypervisor, name: str, timeout: float = 1.0) -> GuestOSInfo | None:
    """What the domain's guest agent says of its OS; None while no agent answers."""
    dom = hypervisor.lookup(name)
    if dom is None:
        return None
    try:
        answer = libvirt_qemu.qemuAgentCommand(
            dom, json.dumps({"execute": "guest-get-osinfo"}), max(int(timeout), 1), 0
        )
    except libvirt.libvirtError:
        return None  # no agent (yet): a guest still booting, or one without it
    return os_info_of(answer) if answer else None
