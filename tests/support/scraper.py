"""Reading an agent's /metrics as Prometheus does: with the token of a service account bound to
the ClusterRole we ship for it (formation-vmm-metrics-reader). The agent answers nobody else:
its series name every tenant's VMs."""

import urllib.request

from formation_vmm.devcluster.cluster import Kubectl

ACCOUNT, NAMESPACE = "prometheus", "formation-vmm"


def scraper_token(kubectl: Kubectl) -> str:
    kubectl.apply_docs(
        [
            {
                "apiVersion": "v1",
                "kind": "ServiceAccount",
                "metadata": {"name": ACCOUNT, "namespace": NAMESPACE},
            },
            {
                "apiVersion": "rbac.authorization.k8s.io/v1",
                "kind": "ClusterRoleBinding",
                "metadata": {"name": "test-prometheus-metrics-reader"},
                "roleRef": {
                    "apiGroup": "rbac.authorization.k8s.io",
                    "kind": "ClusterRole",
                    "name": "formation-vmm-metrics-reader",
                },
                "subjects": [{"kind": "ServiceAccount", "name": ACCOUNT, "namespace": NAMESPACE}],
            },
        ]
    )
    return kubectl("create", "token", ACCOUNT, "-n", NAMESPACE, "--duration=24h").strip()


def scrape(url: str, token: str | None) -> str:
    """``url``'s /metrics text (``url``: the process's base URL)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    request = urllib.request.Request(f"{url}/metrics", headers=headers)
    with urllib.request.urlopen(request, timeout=5) as response:
        return str(response.read().decode())
