"""The files of a cloud-init NoCloud seed for a VM. Pure: the agent writes them into an ISO."""

import yaml

from formation_vmm.api.models import VirtualMachine

# cloud-init's NoCloud datasource finds its seed by this volume label.
SEED_VOLUME_ID = "cidata"


def seed_files(vm: VirtualMachine, user_data: str) -> dict[str, str]:
    """meta-data, user-data and (when given) network-config, keyed by file name.

    instance-id is the VM's uid, so cloud-init runs its once-per-instance modules again only for
    a new VM, not after a restart.
    """
    meta = vm.metadata
    files = {
        "meta-data": yaml.safe_dump({"instance-id": meta.uid, "local-hostname": meta.name}, sort_keys=True),
        "user-data": user_data,
    }
    if vm.spec.cloud_init is not None and vm.spec.cloud_init.network_data:
        files["network-config"] = vm.spec.cloud_init.network_data
    return files
