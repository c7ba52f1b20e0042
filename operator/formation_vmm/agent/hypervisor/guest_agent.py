"""The QEMU guest agent of a domain, through libvirt (its virtio-serial channel
``org.qemu.guest_agent.0``, which every domain has)."""

import json

import libvirt
import libvirt_qemu  # ships with libvirt-python

from formation_vmm.agent.hypervisor.connection import Hypervisor


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
