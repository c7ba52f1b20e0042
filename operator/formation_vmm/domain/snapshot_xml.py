"""libvirt snapshot XML for a snapshot of a running domain's disks and memory. Pure."""

import xml.etree.ElementTree as ET


def memory_snapshot_xml(name: str, skipped_targets: list[str]) -> str:
    """An internal snapshot named ``name`` of every disk but ``skipped_targets`` (read-only
    disks such as the cloud-init seed, which qcow2 snapshots cannot hold) plus memory."""
    root = ET.Element("domainsnapshot")
    ET.SubElement(root, "name").text = name
    disks = ET.SubElement(root, "disks")
    for target in skipped_targets:
        ET.SubElement(disks, "disk", name=target, snapshot="no")
    ET.indent(root, "  ")
    return ET.tostring(root, encoding="unicode") + "\n"
