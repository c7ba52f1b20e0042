"""How the controller reaches the agent of the node a VM is bound to: at the node's address as
the kubelet reports it (``status.addresses``, InternalIP first), on the port the agent publishes,
over TLS pinned to the certificate it publishes (AGENT_ACCESS_ANNOTATION), showing the
controller's own certificate (agent/serving/controller_api.py). An agent chooses its port, never the
host: it cannot point the controller anywhere but at its own node."""

import ipaddress
import json
import ssl
import threading
import time
from dataclasses import dataclass

from formation_vmm import tls
from formation_vmm.api.names import AGENT_ACCESS_ANNOTATION, NODE_LABEL, VM_PLURAL
from formation_vmm.kube import ApiError, Body, Kube, NotFoundError

# A Node's answer is kept this long: a console's reconnections cost no Node GET each.
FRESH_SECONDS = 10.0
ADDRESS_TYPES = ("InternalIP", "ExternalIP")


class Unreachable(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class Link:
    url: str  # https://<node address>:<port>
    context: ssl.SSLContext


def link_of(node: Body, pair: tls.KeyPair) -> Link:
    """Where and how to reach ``node``'s agent, or Unreachable saying why not."""
    name = node.get("metadata", {}).get("name", "")
    raw = (node.get("metadata", {}).get("annotations") or {}).get(AGENT_ACCESS_ANNOTATION)
    try:
        access = json.loads(raw) if raw else {}
        port, certificate = int(access["port"]), str(access["certificate"])
        if not 0 < port < 65536 or not certificate:
            raise ValueError
        tls.der(certificate)
    except (ValueError, KeyError, TypeError):
        raise Unreachable(503, f"the agent of node {name} publishes no usable access endpoint") from None
    addresses = {a.get("type"): a.get("address") for a in node.get("status", {}).get("addresses") or []}
    host = next((addresses[t] for t in ADDRESS_TYPES if addresses.get(t)), None)
    try:
        ip = ipaddress.ip_address(host or "")
    except ValueError:
        raise Unreachable(503, f"node {name} reports no InternalIP") from None
    hostport = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
    return Link(f"https://{hostport}", tls.pinned_client(pair, certificate))


class AgentLinks:
    def __init__(self, kube: Kube, pair: tls.KeyPair) -> None:
        self.kube = kube
        self.pair = pair
        self._lock = threading.Lock()
        self._known: dict[str, tuple[float, str, Link]] = {}  # node -> (read at, what it said, link)

    def of_vm(self, namespace: str, name: str) -> Link:
        """The link to the agent running VM ``namespace/name`` (blocking: two GETs at most)."""
        try:
            vm = self.kube.get(VM_PLURAL, namespace, name)
        except NotFoundError:
            raise Unreachable(404, f'virtualmachines "{name}" not found') from None
        except ApiError as exc:
            raise Unreachable(503, f"cannot read the VM now: {exc}") from None
        node = (vm.get("metadata", {}).get("labels") or {}).get(NODE_LABEL)
        if not node:
            raise Unreachable(409, f"VM {name} is not bound to a node yet")
        return self.of_node(node)

    def of_node(self, node: str) -> Link:
        now = time.monotonic()
        with self._lock:
            known = self._known.get(node)
        if known is not None and now - known[0] < FRESH_SECONDS:
            return known[2]
        try:
            body = self.kube.node(node)
        except ApiError as exc:
            raise Unreachable(503, f"cannot read node {node}: {exc}") from None
        annotation = (body.get("metadata", {}).get("annotations") or {}).get(AGENT_ACCESS_ANNOTATION, "")
        seen = json.dumps([annotation, body.get("status", {}).get("addresses")])
        # The same certificate and address: keep its context (and its pooled connections).
        link = known[2] if known is not None and known[1] == seen else link_of(body, self.pair)
        with self._lock:
            self._known[node] = (now, seen, link)
        return link
