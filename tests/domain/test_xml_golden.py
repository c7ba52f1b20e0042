"""Domain XML golden files: ``golden/<case>-in.yaml`` -> ``golden/<case>-out.xml``.

Regenerate after an intended change with ``VMM_UPDATE_GOLDEN=1 hack/test tests/domain`` and
review the diff.
"""

import os
from pathlib import Path

import pytest

from formation_vmm.api.models import Network, VirtualMachine
from formation_vmm.api.names import MACS_ANNOTATION
from formation_vmm.domain.build import UnsupportedSpecError, build_domain_spec, interface_mac
from formation_vmm.domain.naming import UnsafeNameError, domain_name
from formation_vmm.domain.snapshot_xml import memory_snapshot_xml
from formation_vmm.domain.spec import NodeFirmware, Owner
from formation_vmm.domain.xml import domain_xml, observe
from formation_vmm.macs import derived_mac, legacy_mac
from tests.support.factories import make_vm
from tests.support.golden import CASES, GOLDEN, LAYOUT, bases, render

pytestmark = pytest.mark.pure

OWNER = Owner(namespace="default", name="vm", uid="uid-1")


@pytest.mark.parametrize("case", CASES)
def test_golden(case: str) -> None:
    out = GOLDEN / f"{case}-out.xml"
    got = render(case)
    if os.environ.get("VMM_UPDATE_GOLDEN"):
        out.write_text(got)
    assert got == out.read_text()


def test_there_are_golden_cases() -> None:
    assert len(CASES) >= 2


def test_owner_round_trips_through_the_xml() -> None:
    xml = render("basic")
    meta = observe(xml).metadata
    assert meta is not None
    assert meta.owner == Owner(namespace="prod", name="web", uid="0b6f8a3e-1c2d-4e5f-8a9b-0c1d2e3f4a5b")
    assert meta.spec_hash is not None and len(meta.spec_hash) == 16


def test_a_domain_without_our_metadata_has_no_owner() -> None:
    assert observe("<domain type='kvm'><name>other</name></domain>").metadata is None
    assert observe("not xml").metadata is None


def test_macs_are_stable_local_and_the_recorded_one_wins() -> None:
    """An interface's MAC: macAddress, else the controller's record (40 bits under 02:), else,
    for a VM bound before records, the 24-bit one its domain was defined with (macs.py)."""
    assert legacy_mac("uid-1", "eth0") == legacy_mac("uid-1", "eth0") != legacy_mac("uid-2", "eth0")
    assert legacy_mac("uid-1", "eth0").startswith("52:54:00:")
    given = derived_mac("uid-1", "eth0")
    assert given.startswith("02:") and len(given.split(":")) == 6 and given != derived_mac("uid-1", "eth0", 1)
    net = Network(name="eth0")
    bare = VirtualMachine.model_validate(
        {"metadata": {"name": "v", "namespace": "n", "uid": "uid-1"}, "spec": {}}
    )
    assert interface_mac(bare, net) == legacy_mac("uid-1", "eth0")
    recorded = bare.model_copy(deep=True)
    recorded.metadata.annotations[MACS_ANNOTATION] = f"eth0={given}"
    assert interface_mac(recorded, net) == given
    assert (
        interface_mac(recorded, Network(name="eth0", mac_address="52:54:00:AA:BB:CC")) == "52:54:00:aa:bb:cc"
    )


def test_names_from_manifests_cannot_escape_into_paths() -> None:
    with pytest.raises(UnsafeNameError):
        LAYOUT.disk_path(OWNER, "../../etc/passwd")
    with pytest.raises(UnsafeNameError):
        LAYOUT.disk_dir(Owner(namespace="default", name="vm", uid="../x"))
    with pytest.raises(UnsafeNameError):
        domain_name("default", "a/b")
    with pytest.raises(UnsafeNameError):
        build_domain_spec(make_vm(disks=[{"name": "Bad_Name", "size": "1Gi"}]), LAYOUT, "kvm")


def test_an_image_disk_is_an_overlay_in_the_vms_disk_directory() -> None:
    vm = make_vm(name="vm", disks=[{"name": "root", "image": "debian", "size": "2Gi"}])
    spec = build_domain_spec(vm, LAYOUT, "kvm", bases(vm))
    assert spec.disks[0].path == LAYOUT.disk_path(OWNER, "root")
    assert spec.disks[0].path == Path("/var/lib/formation/vm-disks/default/vm/uid-1/root.qcow2")
    assert spec.disks[0].driver_type == "qcow2"


def test_an_image_disk_smaller_than_its_image_or_a_vm_below_its_minimum_is_refused() -> None:
    small = make_vm(disks=[{"name": "root", "image": "debian", "size": "512Mi"}])
    with pytest.raises(UnsupportedSpecError, match="smaller than image 'debian'"):
        build_domain_spec(small, LAYOUT, "kvm", bases(small))
    vm = make_vm(disks=[{"name": "root", "image": "debian"}])
    with pytest.raises(UnsupportedSpecError, match="at least 4 CPUs"):
        build_domain_spec(vm, LAYOUT, "kvm", bases(vm, min_cpus=4))
    with pytest.raises(UnsupportedSpecError, match="at least 64Gi of memory"):
        build_domain_spec(vm, LAYOUT, "kvm", bases(vm, min_memory="64Gi"))


def test_a_kernel_boot_needs_its_images_resolved() -> None:
    vm = make_vm(kernel={"image": "k"})
    with pytest.raises(UnsupportedSpecError, match="images not resolved: k"):
        build_domain_spec(vm, LAYOUT, "kvm", {})


def test_hostpath_images_stay_inside_the_images_dir() -> None:
    assert LAYOUT.image_path("kernels/vmlinuz") == Path("/img/kernels/vmlinuz")
    for bad in ("/etc/shadow", "../etc/shadow", "a/../../b", "", ".vmm-cache/blobs/x", "a/.hidden"):
        with pytest.raises(UnsafeNameError):
            LAYOUT.image_path(bad)


def test_the_files_a_domain_names_are_read_back_from_its_xml() -> None:
    xml = render("kernel-cloudinit")
    log = "/run/form-vm/default/tiny/11111111-2222-3333-4444-555555555555/console.log"
    observed = observe(xml)
    assert observed.console_log == log
    assert log in observed.file_paths
    assert any(p.endswith("cloud-init.iso") for p in observed.file_paths)
    assert observed.readonly_targets == [d.target for d in observed.disks if d.readonly] != []
    assert observe("not xml").file_paths == [] and observe("<domain/>").console_log is None


def test_memory_snapshot_xml_golden() -> None:
    got = memory_snapshot_xml("vmsnap-1234", ["sda"])
    out = GOLDEN / "memory-snapshot-out.xml"
    if os.environ.get("VMM_UPDATE_GOLDEN"):
        out.write_text(got)
    assert got == out.read_text()


def test_an_interface_joins_the_libvirt_network_made_from_its_vmnetwork() -> None:
    vm = make_vm(networks=[{"name": "eth0"}, {"name": "eth1", "network": "storage"}])
    spec = build_domain_spec(vm, LAYOUT, "kvm", {})
    assert [i.network for i in spec.interfaces] == ["default", "storage"]
    assert observe(domain_xml(spec)).networks == {"vmm-default", "vmm-storage"}  # never a host's own network
    bridged = make_vm(networks=[{"name": "eth0", "bridge": "br-mgmt"}])
    with pytest.raises(UnsupportedSpecError, match="names host bridge 'br-mgmt'"):
        build_domain_spec(bridged, LAYOUT, "kvm", {})


def test_every_interface_carries_the_anti_spoofing_filter_with_its_mac_and_assigned_ip() -> None:
    xml = render("topology-networks")
    assert xml.count('<filterref filter="formation-vmm-guest">') == 3
    assert '<parameter name="MAC" value="02:aa:bb:cc:dd:ee" />' in xml
    # The addresses the controller assigned (ipam), whatever else confirmed them; none on uplink.
    assert '<parameter name="IP" value="10.123.0.7" />' in xml
    assert '<parameter name="IP" value="10.9.0.2" />' in xml
    assert xml.count('<parameter name="IP"') == 2


def test_bios_is_qemus_own_unless_the_node_names_a_firmware_file() -> None:
    vm = make_vm(firmware={"type": "bios"})
    assert "<loader" not in domain_xml(build_domain_spec(vm, LAYOUT, "kvm"))
    node = NodeFirmware(bios=Path("/opt/fw/bios.bin"))
    xml = domain_xml(build_domain_spec(vm, LAYOUT, "kvm", firmware=node))
    assert '<loader readonly="yes" type="rom">/opt/fw/bios.bin</loader>' in xml
    assert "<nvram" not in xml and "smm" not in xml


def test_each_uefi_vm_has_its_own_nvram_with_its_disks() -> None:
    a = build_domain_spec(make_vm(name="a", uid="uid-a", firmware={"type": "efi"}), LAYOUT, "kvm")
    b = build_domain_spec(make_vm(name="b", uid="uid-b", firmware={"type": "efi"}), LAYOUT, "kvm")
    assert a.firmware is not None and b.firmware is not None
    assert a.firmware.nvram != b.firmware.nvram
    assert a.firmware.nvram is not None and a.firmware.nvram.parent == LAYOUT.disk_dir(a.owner)
    assert a.firmware.files() == [
        Path("/usr/share/OVMF/OVMF_CODE_4M.fd"),
        Path("/usr/share/OVMF/OVMF_VARS_4M.fd"),
    ]


def test_what_libvirt_adds_to_a_running_domain_reads_back() -> None:
    """The live XML of a running UEFI domain: libvirt's source indexes name QEMU's block nodes;
    the NVRAM file says the domain's variables go with it when it is undefined."""
    live = """<domain type='kvm'><os><loader readonly='yes' type='pflash'>/usr/share/OVMF/c.fd</loader>
      <nvram template='/usr/share/OVMF/v.fd'>/var/lib/d/nvram.fd</nvram></os><devices>
      <disk type='file' device='disk'><source file='/d/root.qcow2' index='2'/><target dev='vda'/></disk>
      <disk type='file' device='cdrom'><source file='/r/seed.iso' index='1'/><target dev='sda'/>
      <readonly/></disk>
      </devices></domain>"""
    observed = observe(live)
    assert observed.nvram == "/var/lib/d/nvram.fd"
    assert observed.block_nodes == {"/d/root.qcow2": "libvirt-2-format", "/r/seed.iso": "libvirt-1-format"}
    assert observed.readonly_targets == ["sda"]
    assert observe("<domain><os/></domain>").nvram is None
