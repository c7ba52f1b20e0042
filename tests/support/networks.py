"""VmNetworks made for one test: cluster-scoped, so each is named (and addressed) apart from
every other, and deleted after the test."""

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.support.fleet import Fleet

MakeNetwork = Callable[..., str]


@pytest.fixture
def make_network(fleet: Fleet) -> Iterator[MakeNetwork]:
    made: list[str] = []

    def make(subnet: str, mode: str = "nat", **spec: Any) -> str:
        """A VmNetwork of ``mode`` on ``subnet`` (none for mode bridge: pass "")."""
        name = f"net-{uuid.uuid4().hex[:8]}"
        if subnet:
            spec["subnet"] = subnet
        fleet.apply(
            {
                "apiVersion": "vmm.formation.cloud/v1alpha1",
                "kind": "VmNetwork",
                "metadata": {"name": name},
                "spec": {"mode": mode, **spec},
            }
        )
        made.append(name)
        return name

    yield make
    for name in made:
        fleet.kubectl("delete", "vmnetwork", name, "--wait=false", check=False)
