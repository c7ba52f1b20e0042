"""What users boot first, on real QEMU (TCG): a Debian 12 cloud image built here from Debian's
packages (formation_vmm/devcluster/debian_image.py), served over loopback HTTP as a qcow2
VmImage, booted from a root-disk overlay through SeaBIOS and through OVMF, configured by
cloud-init from the VM's spec and from a Secret. The BIOS guest is on a network (DHCP, its HTTP
probe target answering the readiness probe, its guest agent confirming the assigned address);
the EFI guest's readiness is its guest agent's ping. Both report their OS through the agent,
take filesystem-consistent live snapshots and stop cleanly, one on ACPI, one (which ignores
ACPI) through its guest agent. The two guests boot side by side: each takes a minute or more
under TCG."""

import base64
import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import pytest
import yaml

from formation_vmm.api.names import GROUP, VERSION
from formation_vmm.devcluster import debian_image
from tests.support.fleet import ON_QEMU, QEMU_NODE, Fleet, condition
from tests.support.image_server import ImageServer, serve
from tests.support.waiting import wait_for

pytestmark = pytest.mark.guest

# A public key, as a user pastes it: cloud-init writes it, nothing here logs in with it.
SSH_KEY = "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIOgqNbVwq3Bs7nOb2mNTlV8DWuEQ4tXGXYyZ4nUo4RmZ tester@formation"
CHECK = "formation-check"
# cloud-init's final message ("Cloud-init v. 22.4.2 finished at ...").
FINISHED = " finished at "
# The VM's network config (networkData, version 2): its NIC renamed to lan0 by MAC and given
# DHCP, which cloud-init's fallback config (eth0, unrenamed) would not do.
LAN_MAC = "52:54:00:0f:0e:0d"
NETWORK_DATA = yaml.safe_dump(
    {
        "version": 2,
        "ethernets": {"lan0": {"match": {"macaddress": LAN_MAC}, "set-name": "lan0", "dhcp4": True}},
    }
)
DONE = ("Ready", "Succeeded", "Failed")  # a VmSnapshot's or VmRestore's last phases


def user_data(hostname: str, ignore_acpi: bool = False, report_links: bool = False) -> str:
    """cloud-config that sets the hostname, creates a user with an SSH key and writes a file,
    then prints what the guest sees of each (and its root filesystem's size) on the console.
    With ``ignore_acpi``, the kernel's ACPI power-button driver lets go of the button, so
    pressing it does nothing: a guest that ignores ACPI (logind, which the guest agent's
    shutdown goes through, keeps running)."""
    report = (
        f'echo "{CHECK} hostname=$(hostname) key=$(cat /home/tester/.ssh/authorized_keys)'
        ' file=$(cat /etc/formation/hello) rootmib=$(df -m --output=size / | sed 1d)"'
        " > /dev/console"
    )
    files = [{"path": "/etc/formation/hello", "content": f"hello {hostname}\n"}]
    commands = [["sh", "-c", report]]
    if report_links:
        links = f"echo {CHECK}-links $(ls /sys/class/net | tr '\\n' ' ') > /dev/console"
        commands.append(["sh", "-c", links])
    if ignore_acpi:
        unbind = "echo LNXPWRBN:00 > /sys/bus/acpi/drivers/button/unbind"
        commands.insert(0, ["sh", "-c", f"{unbind} && echo {CHECK}-acpi ignored > /dev/console"])
    doc = {
        "hostname": hostname,
        "users": [{"name": "tester", "shell": "/bin/bash", "ssh_authorized_keys": [SSH_KEY]}],
        "write_files": files,
        "runcmd": commands,
    }
    return "#cloud-config\n" + yaml.safe_dump(doc)


@pytest.fixture(scope="module")
def served_image(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ImageServer]:
    image = debian_image.build()
    root = tmp_path_factory.mktemp("debian")
    (root / "debian-12.qcow2").symlink_to(image)
    with serve(root) as server:
        yield server


def guest_spec(firmware: str, **extra: object) -> dict[str, object]:
    return {
        **ON_QEMU,
        "memory": "512Mi",
        "firmware": {"type": firmware},
        # systemd powers off on ACPI well within this; a guest that ignores ACPI is asked
        # through its guest agent after half of it; the agent destroys only past it.
        "terminationGracePeriodSeconds": 60,
        # The image's disk is 1 GiB; the overlay is twice that, and growpart takes the rest.
        "disks": [{"name": "root", "image": "debian-12", "size": "2Gi", "bootOrder": 1}],
        "readinessProbe": {"guestAgentPing": {}, "periodSeconds": 5, "timeoutSeconds": 5},
        **extra,
    }


def reported(text: str) -> dict[str, str]:
    """The guest's own report (see user_data), as key=value pairs; empty until printed."""
    for line in text.splitlines():
        if line.startswith(CHECK + " "):
            fields = line[len(CHECK) + 1 :].split(" file=")
            head, _, rest = fields[0].partition(" key=")
            file_text, _, root = fields[1].rpartition(" rootmib=")
            return {
                "hostname": head.removeprefix("hostname="),
                "key": rest,
                "file": file_text,
                "rootmib": root.strip(),
            }
    return {}


def apply_and_wait(fleet: Fleet, ns: str, kind: str, name: str, spec: dict[str, object]) -> dict[str, Any]:
    """A VmSnapshot or VmRestore, once it is done (or failed)."""
    meta = {"name": name, "namespace": ns}
    fleet.apply({"apiVersion": f"{GROUP}/{VERSION}", "kind": kind, "metadata": meta, "spec": spec})

    def finished() -> dict[str, Any] | None:
        found = json.loads(fleet.kubectl("get", kind.lower(), name, "-n", ns, "-o", "json"))
        return found if found.get("status", {}).get("phase") in DONE else None

    return wait_for(finished, 120, f"{kind} {name}")  # type: ignore[no-any-return]


def test_debian_boots_through_bios_and_uefi_with_cloud_init_and_guest_agent(
    fleet: Fleet, ns: str, served_image: ImageServer
) -> None:
    fleet.apply(
        {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": "VmImage",
            "metadata": {"name": "debian-12", "namespace": ns},
            "spec": {"source": {"http": {"url": served_image.url("/files/debian-12.qcow2")}}},
        }
    )
    secret_user_data = user_data("from-a-secret", ignore_acpi=True)
    fleet.apply(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "efi-user-data", "namespace": ns},
            "data": {"userdata": base64.b64encode(secret_user_data.encode()).decode()},
        }
    )
    # The BIOS guest is on node-q's default network (inside the namespace the tests made):
    # cloud-init's fallback config takes a DHCP lease on eth0, its readiness is the image's HTTP
    # probe target, and its guest agent confirms the address the controller assigned.
    fleet.apply_vm(
        ns,
        "bios",
        **guest_spec(
            "bios",
            cloudInit={
                "userData": user_data("from-the-spec", report_links=True),
                "networkData": NETWORK_DATA,
            },
            networks=[{"name": "eth0", "macAddress": LAN_MAC}],
            readinessProbe={
                "httpGet": {"port": debian_image.PROBE_PORT, "path": "/healthz"},
                "periodSeconds": 5,
            },
        ),
    )
    fleet.apply_vm(ns, "efi", **guest_spec("efi", cloudInit={"userDataSecretRef": {"name": "efi-user-data"}}))

    expected = {"bios": "from-the-spec", "efi": "from-a-secret"}
    for name in expected:
        fleet.wait_phase(ns, name, "Running", 300)
    for name, hostname in expected.items():
        # cloud-init's last stage and the image's own marker (a unit after multi-user.target)
        # come in either order: a cold CI run saw cloud-init finish first.
        def finished(n: str = name) -> str | None:
            text = fleet.console(ns, n)
            return text if FINISHED in text and debian_image.BOOTED_MARKER in text else None

        text = wait_for(finished, 420, f"cloud-init to finish and the guest to say it booted in {name}")
        assert "Datasource DataSourceNoCloud" in text  # the VM's seed, not the fallback
        seen = reported(text)
        assert seen == {
            "hostname": hostname,
            "key": SSH_KEY,
            "file": f"hello {hostname}",
            "rootmib": seen.get("rootmib", ""),
        }, text[-3000:]
        if name == "bios":  # the network config from the spec was applied, not the fallback
            links = next(line for line in text.splitlines() if line.startswith(f"{CHECK}-links "))
            assert "lan0" in links.split() and "eth0" not in links.split(), links
        # growpart and resize2fs took the root filesystem from the image's 1 GiB to the disk's 2.
        assert int(seen["rootmib"]) > 1500, seen
    if_firmware = fleet.virsh("dumpxml", f"{ns}_efi")
    assert "OVMF_CODE" in if_firmware and "nvram" in if_firmware

    agreed = fleet.wait_vm(
        ns,
        "bios",
        lambda v: "guest-agent" in v["status"].get("interfaces", [{}])[0].get("infoSource", ""),
        "the guest agent to confirm the address",
        120,
    )
    eth0 = agreed["status"]["interfaces"][0]
    assert eth0["infoSource"].startswith("ipam") and eth0["ipAddress"], eth0
    assert condition(agreed, "AddressesMatch")["status"] == "True"
    for name in expected:
        vm = fleet.wait_vm(ns, name, lambda v: condition(v, "Ready").get("status") == "True", "Ready", 120)
        assert condition(vm, "Ready")["reason"] == "ReadinessProbeSucceeded"
        # For the record (hack/test tests/guests -s): TCG boot to Ready, per firmware.
        ready = datetime.fromisoformat(condition(vm, "Ready")["lastTransitionTime"])
        started = datetime.fromisoformat(vm["status"]["startedAt"])
        print(f"\n{name}: Ready {(ready - started).total_seconds():.0f} s after the domain started")
        assert (condition(vm, "Bootable")["status"], condition(vm, "Bootable")["message"]) == (
            "True",
            "disk root",
        )
        # What the guest agent says of the OS it runs in.
        vm = fleet.wait_vm(ns, name, lambda v: "guestOSInfo" in v.get("status", {}), "guestOSInfo", 60)
        info = vm["status"]["guestOSInfo"]
        assert info["id"] == "debian" and info["versionId"] == "12", info
        assert info["prettyName"] == "Debian GNU/Linux 12 (bookworm)", info
        assert info["kernelRelease"].endswith("-cloud-amd64") and info["machine"] == "x86_64", info

    # A snapshot of a running guest whose agent answers is taken with its filesystems frozen
    # (filesystem-consistent) and thawed after: the clean stops below would hang on a frozen one.
    snapshots = {}
    for vm_name in expected:
        snap = apply_and_wait(fleet, ns, "VmSnapshot", f"live-{vm_name}", {"vmName": vm_name})
        snapshots[vm_name] = snap
        status = snap["status"]
        assert status["phase"] == "Ready", status
        assert status["indications"] == ["Online", "GuestAgent"] and status["memory"] is False, status

    # libvirt keeps no memory snapshot of a UEFI VM (its NVRAM is a raw pflash file): the
    # VmSnapshot fails with libvirt's reason, and the VM runs on.
    memory = apply_and_wait(fleet, ns, "VmSnapshot", "with-memory", {"vmName": "efi", "includeMemory": True})
    assert memory["status"]["phase"] == "Failed" and "pflash" in memory["status"]["error"], memory["status"]
    assert fleet.vm(ns, "efi")["status"]["phase"] == "Running"

    # A stop is an ACPI power-off that systemd carries out within the grace period: the kernel
    # says so as the last thing, which a destroyed domain never prints. The EFI guest ignores
    # the power button: halfway through its grace period its guest agent is asked instead.
    assert f"{CHECK}-acpi ignored" in fleet.console(ns, "efi")
    for name in expected:
        out = fleet.plugin("-n", ns, "stop", name)
        assert out.returncode == 0, out.stderr
    for name in expected:
        vm = fleet.wait_phase(ns, name, "Stopped", 120)
        assert "reboot: Power down" in fleet.console(ns, name), name
        assert "guestOSInfo" not in vm["status"]
        assert vm["status"].get("restartCount", 0) == 0
    selector = "reason=GuestAgentShutdown"
    asked = fleet.kubectl("get", "events", "-n", ns, "--field-selector", selector, "-o", "yaml")
    assert [e["involvedObject"]["name"] for e in yaml.safe_load(asked)["items"]] == ["efi"]

    # The EFI VM's snapshot kept its UEFI variables beside its disks; a restore brings them back
    # over whatever the VM holds now (here: variables wiped while it was stopped).
    snap_uid = snapshots["efi"]["metadata"]["uid"]
    nvram = fleet.vm_disk(QEMU_NODE, ns, "efi", "root").with_name("nvram.fd")
    kept = nvram.with_name(f"nvram-vmsnap-{snap_uid}.fd")
    saved = kept.read_bytes()
    assert len(saved) == nvram.stat().st_size and saved.strip(b"\0")
    nvram.write_bytes(b"\0" * len(saved))
    restored = apply_and_wait(fleet, ns, "VmRestore", "back", {"vmName": "efi", "snapshotName": "live-efi"})
    assert restored["status"]["phase"] == "Succeeded", restored["status"]
    assert nvram.read_bytes() == saved
    # Deleting the snapshot removes the copy with its data.
    fleet.kubectl("delete", "vmsnapshot", "live-efi", "-n", ns)
    wait_for(lambda: not kept.exists(), 60, "the snapshot's NVRAM copy to go")
