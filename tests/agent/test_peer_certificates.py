"""The relay's certificate lookups (agent/migration/peer_certificates.py), pure: a flood of connections
naming nodes before TLS costs the apiserver a bounded number of Node reads (issue 26, finding
7). The lookup here counts calls in place of the Node GET: what is tested is how often it is
made, which a real apiserver could only show as a rate."""

import pytest

from formation_vmm.agent.migration.peer_certificates import PeerCertificates

pytestmark = pytest.mark.pure


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_kept_and_refusals_too() -> None:
    clock, asked = Clock(), []
    published = {"node-b": "CERT-B"}

    def lookup(node: str) -> str | None:
        asked.append(node)
        return published.get(node)

    certs = PeerCertificates(lookup, clock, fresh=60, retry=5, per_second=5)
    assert [certs("node-b") for _ in range(100)] == ["CERT-B"] * 100
    assert [certs("ghost") for _ in range(100)] == [None] * 100
    assert asked == ["node-b", "ghost"]
    clock.now += 6  # past retry, not past fresh: a certificate is still fresh; none is retried
    certs("node-b")
    certs("ghost")
    assert asked == ["node-b", "ghost", "ghost"]
    clock.now += 60
    published["node-b"] = "CERT-B2"  # a node that made a new key is believed once fresh runs out
    assert certs("node-b") == "CERT-B2"


def test_a_flood_of_names_is_rate_limited() -> None:
    clock, asked = Clock(), []

    def lookup(node: str) -> str | None:
        asked.append(node)
        return None

    certs = PeerCertificates(lookup, clock, per_second=5, limit=100)
    for i in range(1000):
        assert certs(f"made-up-{i}") is None
    assert len(asked) == 5  # the bucket's burst, then nothing until it refills
    clock.now += 1
    for i in range(1000, 2000):
        certs(f"made-up-{i}")
    assert len(asked) == 10
