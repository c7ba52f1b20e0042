"""Direct Kubernetes API calls the handlers need beyond what kopf does for them.

The one place that builds a kubernetes client; kopf's own calls go through kopf.
"""

import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any

from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException

from formation_vmm import metrics
from formation_vmm.api.names import GROUP, NODE_LABEL, VERSION, VM_PLURAL

log = logging.getLogger(__name__)


def _load_config() -> None:
    try:
        config.load_incluster_config()  # type: ignore[no-untyped-call]
    except ConfigException:
        config.load_kube_config()  # type: ignore[no-untyped-call]


def core_api() -> client.CoreV1Api:
    _load_config()
    return client.CoreV1Api()


def annotate_node(api: client.CoreV1Api, node: str, annotations: dict[str, str]) -> None:
    api.patch_node(node, {"metadata": {"annotations": annotations}})


def node_summary(body: dict[str, Any]) -> dict[str, Any]:
    """The parts of a Node the controller's placement reads."""
    meta = body.get("metadata", {})
    spec = body.get("spec", {})
    return {
        "name": meta.get("name"),
        "labels": dict(meta.get("labels") or {}),
        "annotations": dict(meta.get("annotations") or {}),
        "taints": [dict(t) for t in spec.get("taints") or []],
    }


StatusUpdate = Callable[[dict[str, Any]], dict[str, Any]]


class StatusWriter:
    """Writes a custom object's status (and labels, finalizers) with optimistic concurrency.

    The controller and the agent both write a VM's status, and a JSON merge patch replaces lists
    whole; a writer working from a stale copy would erase the other's conditions. So each write
    carries the resourceVersion it was computed from, and on a conflict the update is computed
    again from a fresh read. ``update`` maps the current status to the fields to change.
    """

    def __init__(self, api: client.CustomObjectsApi, group: str, version: str, plural: str) -> None:
        self.api = api
        self.group = group
        self.version = version
        self.plural = plural

    def write(self, body: dict[str, Any], update: StatusUpdate, attempts: int = 10) -> dict[str, Any] | None:
        """Apply ``update`` to ``body``'s status. Returns the object as written, or None when it
        no longer exists (a VM deleted meanwhile has no status to keep)."""
        meta = body["metadata"]
        current = body
        for attempt in range(attempts):
            fields = update(dict(current.get("status") or {}))
            patch = {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "status": fields,
            }
            metrics.STATUS_WRITES.inc()
            try:
                written: Any = self.api.patch_namespaced_custom_object_status(
                    self.group, self.version, meta["namespace"], self.plural, meta["name"], patch
                )
                return dict(written)
            except client.ApiException as exc:
                if exc.status == 404:
                    return None
                if exc.status != 409:
                    raise
            # Another writer got there first (kopf's own patches, the other process): back off
            # a little, with jitter, so two writers do not keep colliding in lockstep.
            time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 - jitter, not crypto
            fresh = self.get_or_none(meta["namespace"], meta["name"])
            if fresh is None:
                return None
            current = fresh
        raise RuntimeError(f"status of {meta['namespace']}/{meta['name']} kept changing under us")

    def add_finalizer(self, body: dict[str, Any], finalizer: str) -> None:
        self._edit_finalizers(body, lambda names: names if finalizer in names else [*names, finalizer])

    def remove_finalizer(self, body: dict[str, Any], finalizer: str) -> None:
        self._edit_finalizers(body, lambda names: [n for n in names if n != finalizer])

    def _edit_finalizers(self, body: dict[str, Any], edit: Callable[[list[str]], list[str]]) -> None:
        """Change the finalizer list at the resourceVersion it was read at (a merge patch
        replaces the whole list, so another writer's change must not be lost)."""
        current: dict[str, Any] | None = body
        for attempt in range(10):
            if current is None:
                return
            meta = current["metadata"]
            names = list(meta.get("finalizers") or [])
            wanted = edit(names)
            if wanted == names:
                return
            patch = {"metadata": {"finalizers": wanted, "resourceVersion": meta["resourceVersion"]}}
            try:
                self.api.patch_namespaced_custom_object(
                    self.group, self.version, meta["namespace"], self.plural, meta["name"], patch
                )
                return
            except client.ApiException as exc:
                if exc.status == 404:
                    return
                if exc.status != 409:
                    raise
            time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 - jitter, not crypto
            current = self.get_or_none(meta["namespace"], meta["name"])
        raise RuntimeError(f"finalizers of {body['metadata']['name']} kept changing under us")

    def get_or_none(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The object as the API has it now, or None when it is gone."""
        try:
            return self.get(namespace, name)
        except client.ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        found: Any = self.api.get_namespaced_custom_object(
            self.group, self.version, namespace, self.plural, name
        )
        return dict(found)

    def set_label(self, body: dict[str, Any], key: str, value: str, finalizer: str | None = None) -> bool:
        """Set a label (and add a finalizer) only if the object is still at ``body``'s
        resourceVersion (optimistic concurrency). False when it changed meanwhile (or is gone):
        re-read and decide again."""
        meta = body["metadata"]
        new_meta: dict[str, Any] = {"labels": {key: value}, "resourceVersion": meta["resourceVersion"]}
        patch = {"metadata": new_meta}
        if finalizer is not None:
            # A merge patch replaces the list: keep the finalizers there are, add ours.
            current = list(meta.get("finalizers") or [])
            new_meta["finalizers"] = current + ([finalizer] if finalizer not in current else [])
        try:
            self.api.patch_namespaced_custom_object(
                self.group, self.version, meta["namespace"], self.plural, meta["name"], patch
            )
        except client.ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True


def custom_api() -> client.CustomObjectsApi:
    _load_config()
    return client.CustomObjectsApi()


def ensure_cluster_peering(api: client.CustomObjectsApi, name: str) -> None:
    """Create kopf's ClusterKopfPeering object unless it exists: `kubectl apply` cannot create it
    in the same run as its CRD, so the controller makes its own on start."""
    body = {"apiVersion": "kopf.dev/v1", "kind": "ClusterKopfPeering", "metadata": {"name": name}}
    try:
        api.create_cluster_custom_object("kopf.dev", "v1", "clusterkopfpeerings", body)
    except client.ApiException as exc:
        if exc.status != 409:
            raise


class EventRecorder:
    """Posts Kubernetes Events about VMs, the `kubectl describe` story.

    Ours rather than kopf's because the agent also reports from outside kopf's handlers (libvirt
    lifecycle events, the periodic resync), where kopf's posting context does not exist.
    """

    def __init__(self, api: client.CoreV1Api, component: str, host: str | None = None) -> None:
        self.api = api
        self.component = component
        self.host = host
        # Posted in the background: the work an event reports on must not wait for the event.
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="events")

    def post(self, body: dict[str, Any], kind: str, reason: str, message: str, type_: str = "Normal") -> None:
        self._pool.submit(self._post, body, kind, reason, message, type_)

    def _post(self, body: dict[str, Any], kind: str, reason: str, message: str, type_: str) -> None:
        meta = body["metadata"]
        now = datetime.now(UTC)
        event = client.CoreV1Event(
            metadata=client.V1ObjectMeta(generate_name=f"{meta['name']}.", namespace=meta["namespace"]),
            involved_object=client.V1ObjectReference(
                api_version=body.get("apiVersion"),
                kind=kind,
                name=meta["name"],
                namespace=meta["namespace"],
                uid=meta.get("uid"),
                resource_version=meta.get("resourceVersion"),
            ),
            reason=reason,
            message=message[:1024],
            type=type_,
            source=client.V1EventSource(component=self.component, host=self.host),
            first_timestamp=now,
            last_timestamp=now,
            count=1,
        )
        try:
            self.api.create_namespaced_event(meta["namespace"], event)
        except client.ApiException as exc:
            # An event is a courtesy to the user; failing to post one must not fail the work.
            log.warning(
                "cannot post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc.reason
            )


def vm_bound_here(api: client.CustomObjectsApi, node: str) -> Callable[[str, str, str], bool]:
    """A check whether a VM still exists with that uid and is bound to ``node``. Any doubt (an
    API error) answers yes: it guards the removal of domains."""

    def exists(namespace: str, name: str, uid: str) -> bool:
        try:
            vm: Any = api.get_namespaced_custom_object(GROUP, VERSION, namespace, VM_PLURAL, name)
        except client.ApiException as exc:
            return bool(exc.status != 404)
        meta = vm.get("metadata", {})
        return bool(meta.get("uid") == uid and (meta.get("labels") or {}).get(NODE_LABEL) == node)

    return exists
