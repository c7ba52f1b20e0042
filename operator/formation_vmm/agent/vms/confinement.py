"""Whether the node's libvirt confines QEMU, read from its capabilities XML. Pure.

A guest that escapes QEMU holds what QEMU holds. libvirt confines each QEMU with a security
driver: a MAC one (SELinux, AppArmor) labels every VM apart, and DAC runs QEMU as an unprivileged
user. A libvirt with neither (model ``none`` only), or with DAC alone while QEMU runs as root
(base label ``+0:+0``), confines nothing, and the agent refuses to start on it unless the admin
says otherwise (``allow_unconfined_qemu``, for development and tests only)."""

import xml.etree.ElementTree as ET

MAC_MODELS = {"selinux", "apparmor"}


def confinement_problem(capabilities_xml: str) -> str | None:
    """Why QEMU on this node would run unconfined, or None when it is confined."""
    host = ET.fromstring(capabilities_xml).find("host")  # noqa: S314 - libvirt's own output, not user input
    models: dict[str, set[str]] = {}
    for secmodel in host.findall("secmodel") if host is not None else []:
        name = (secmodel.findtext("model") or "").strip()
        models[name] = {(label.text or "").strip() for label in secmodel.findall("baselabel")}
    real = {name for name in models if name and name != "none"}
    if not real:
        return "libvirt on this node has no security driver (secmodel none): QEMU would run unconfined"
    if real & MAC_MODELS or real - {"dac"}:
        return None  # a MAC driver (or the test driver's own model)
    if models["dac"] and all(label.startswith("+0:") for label in models["dac"]):
        return (
            "libvirt on this node confines QEMU with DAC only and runs it as root (qemu.conf user); "
            "set user/group to an unprivileged user or enable SELinux or AppArmor"
        )
    return None
