"""The certificate the controller serves its aggregated API with, shared by its replicas: kept
in a Secret of its namespace (made by the first replica that finds none), and named by the
APIService's caBundle, so the apiserver trusts exactly it. Agents trust exactly it too, as the
only client they answer (agent/serving/controller_api.py)."""

import base64
import logging

from formation_vmm import tls
from formation_vmm.api.names import SUBRESOURCES_API_SERVICE, SUBRESOURCES_SECRET, SUBRESOURCES_SERVICE
from formation_vmm.kube import ConflictError, Kube, NotFoundError

log = logging.getLogger(__name__)


def load_or_create(kube: Kube, namespace: str) -> tls.KeyPair:
    """The pair in the Secret; one made and stored first when there is none."""
    try:
        return _pair(kube.secret(namespace, SUBRESOURCES_SECRET))
    except NotFoundError:
        pass
    service = f"{SUBRESOURCES_SERVICE}.{namespace}.svc"
    pair = tls.self_signed(service, (service, f"{service}.cluster.local"))
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "type": "kubernetes.io/tls",
        "metadata": {"name": SUBRESOURCES_SECRET, "namespace": namespace},
        "data": {
            "tls.crt": base64.b64encode(pair.cert_pem.encode()).decode(),
            "tls.key": base64.b64encode(pair.key_pem).decode(),
        },
    }
    try:
        kube.create_secret(namespace, body)
    except ConflictError:  # another replica made it first: use theirs
        return _pair(kube.secret(namespace, SUBRESOURCES_SECRET))
    return pair


def _pair(secret: dict[str, object]) -> tls.KeyPair:
    data = secret.get("data") or {}
    assert isinstance(data, dict)
    return tls.KeyPair(base64.b64decode(data["tls.key"]), base64.b64decode(data["tls.crt"]).decode())


def publish(kube: Kube, pair: tls.KeyPair) -> bool:
    """Make the APIService's caBundle name our certificate; whether it does now."""
    bundle = base64.b64encode(pair.cert_pem.encode()).decode()
    try:
        current = (kube.api_service(SUBRESOURCES_API_SERVICE).get("spec") or {}).get("caBundle")
    except NotFoundError:
        log.warning(
            "APIService %s is missing: consoles and counters are unavailable until it is installed",
            SUBRESOURCES_API_SERVICE,
        )
        return False
    if current != bundle:
        kube.patch_api_service(SUBRESOURCES_API_SERVICE, {"spec": {"caBundle": bundle}})
        log.info("APIService %s now names this controller's certificate", SUBRESOURCES_API_SERVICE)
    return True
