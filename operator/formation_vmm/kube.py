"""The one module that talks to the Kubernetes API (kopf's own watches aside): custom objects,
Secrets, Nodes, Events, reviews. ``ApiException`` is turned into this module's errors here, once;
objects come back as plain dicts (custom objects as the API sends them, core objects serialized
the same way), so callers never see the client library's types."""

import base64
import contextlib
import json
import logging
import random
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

import urllib3
from kubernetes import client, config
from kubernetes.config.config_exception import ConfigException
from pydantic import BaseModel

from formation_vmm import __version__, metrics
from formation_vmm.api.models import to_wire
from formation_vmm.api.names import GROUP, VERSION

log = logging.getLogger(__name__)

Body = dict[str, Any]


@dataclass(frozen=True)
class Resource:
    """A kind of object as the API serves it: our CRDs' plurals, or any group's."""

    plural: str
    group: str = GROUP
    version: str = VERSION
    namespace: str | None = None  # None: every namespace (or a cluster-scoped kind)

    def path(self) -> str:
        base = f"/api/{self.version}" if not self.group else f"/apis/{self.group}/{self.version}"
        scope = f"/namespaces/{self.namespace}" if self.namespace else ""
        return f"{base}{scope}/{self.plural}"


def _resource(resource: "Resource | str") -> Resource:
    return Resource(resource) if isinstance(resource, str) else resource


class ApiError(RuntimeError):
    """The API refused a request; ``status`` is the HTTP status, the message the API's own."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NotFoundError(ApiError):
    pass


class ConflictError(ApiError):
    """409: the object changed since it was read (or already exists, for a create)."""


class GoneError(ApiError):
    """410: a watch's resourceVersion is older than the apiserver keeps; list again."""


@contextlib.contextmanager
def _unreachable_as_api_error() -> Iterator[None]:
    """urllib3's errors (refused, reset, timed out: the apiserver away or restarting) as an
    ApiError with status 0, for the callers that go on: the VM watch lists again."""
    try:
        yield
    except urllib3.exceptions.HTTPError as exc:
        raise ApiError(0, f"cannot reach the API: {exc}") from None


def _watch_event(event: Body) -> tuple[str, Body]:
    kind, obj = str(event.get("type") or ""), dict(event.get("object") or {})
    if kind == "ERROR":  # a Status object
        code = int(obj.get("code") or 0)
        raise (GoneError if code == 410 else ApiError)(code, str(obj.get("message") or "watch failed"))
    return kind, obj


def _translate(exc: client.ApiException) -> ApiError:
    message = str(exc.reason)
    with contextlib.suppress(ValueError):
        message = str(json.loads(exc.body or "{}").get("message") or message)
    status = int(exc.status or 0)
    kind = {404: NotFoundError, 409: ConflictError, 410: GoneError}.get(status, ApiError)
    return kind(status, message)


def load_config(kubeconfig: str | None = None, context: str | None = None) -> None:
    """In a pod: the service account; else the kubeconfig (``$KUBECONFIG`` or ``kubeconfig``)."""
    if kubeconfig is None and context is None:
        try:
            config.load_incluster_config()  # type: ignore[no-untyped-call]
            return
        except ConfigException:
            pass
    config.load_kube_config(config_file=kubeconfig, context=context)  # type: ignore[no-untyped-call]


def kubeconfig_namespace(kubeconfig: str | None = None) -> str:
    """The namespace of the kubeconfig's current context, else ``default``."""
    try:
        _, active = config.list_kube_config_contexts(config_file=kubeconfig)  # type: ignore[no-untyped-call]
    except ConfigException:
        return "default"
    return str((active or {}).get("context", {}).get("namespace") or "default")


class Kube:
    """A Kubernetes API client for one process; thread-safe (the client's pool is)."""

    def __init__(self, api_client: client.ApiClient | None = None, user_agent: str = "formation-vmm") -> None:
        self._client = api_client or client.ApiClient()
        # The apiserver names the field manager of every write after the User-Agent (up to its
        # first "/"): without this, managedFields and audit logs say "OpenAPI-Generator".
        self._client.user_agent = f"{user_agent}/{__version__}"
        self._custom = client.CustomObjectsApi(self._client)
        self._core = client.CoreV1Api(self._client)
        self._auth = client.AuthenticationV1Api(self._client)
        self._authz = client.AuthorizationV1Api(self._client)
        self._coordination = client.CoordinationV1Api(self._client)
        self._registration = client.ApiregistrationV1Api(self._client)

    @classmethod
    def from_kubeconfig(cls, path: str) -> "Kube":
        """A client of the cluster ``path`` names, leaving the process's default alone."""
        return cls(config.new_client_from_config(config_file=path))  # type: ignore[no-untyped-call]

    def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except client.ApiException as exc:
            raise _translate(exc) from None

    def _plain(self, obj: Any) -> Body:
        return dict(self._client.sanitize_for_serialization(obj))  # type: ignore[no-untyped-call]

    # --- custom objects of our group ----------------------------------------------------------

    def get(self, plural: str, namespace: str | None, name: str) -> Body:
        if namespace is None:
            return dict(self._call(self._custom.get_cluster_custom_object, GROUP, VERSION, plural, name))
        return dict(
            self._call(self._custom.get_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)
        )

    def get_or_none(self, plural: str, namespace: str | None, name: str) -> Body | None:
        try:
            return self.get(plural, namespace, name)
        except NotFoundError:
            return None

    def _list(self, plural: str, namespace: str | None, label_selector: str) -> Body:
        """The list response as the API sent it (items and the list's metadata)."""
        if namespace is None:
            return dict(
                self._call(
                    self._custom.list_cluster_custom_object,
                    GROUP,
                    VERSION,
                    plural,
                    label_selector=label_selector,
                )
            )
        return dict(
            self._call(
                self._custom.list_namespaced_custom_object,
                GROUP,
                VERSION,
                namespace,
                plural,
                label_selector=label_selector,
            )
        )

    def list_at(
        self, resource: "Resource | str", label_selector: str = "", field_selector: str = ""
    ) -> tuple[list[Body], str]:
        """Every object of ``resource`` (one of our plurals, or any Resource) and the list's
        resourceVersion: where a watch takes up from. Parsed as JSON, not into the client
        library's models (a list of every VM would cost more in models than in JSON)."""
        query = {"labelSelector": label_selector, "fieldSelector": field_selector}
        response = self._raw(_resource(resource).path(), query, (10, 60))
        try:
            found = json.loads(response.read())
        finally:
            response.release_conn()
        version = str((found.get("metadata") or {}).get("resourceVersion") or "")
        return [dict(item) for item in found.get("items") or []], version

    def list(self, plural: str, namespace: str | None = None, label_selector: str = "") -> list[Body]:
        return [dict(item) for item in self._list(plural, namespace, label_selector).get("items") or []]

    def watch(
        self,
        resource: "Resource | str",
        resource_version: str,
        label_selector: str = "",
        timeout_seconds: int = 60,
        field_selector: str = "",
    ) -> Iterator[tuple[str, Body]]:
        """One watch request of ``resource`` from ``resource_version``: its events as (type,
        object) as they arrive, BOOKMARKs included, until the apiserver ends it
        (``timeout_seconds``). Raises GoneError when that version is too old to watch from.
        The response is read line by line, unparsed by the client library: this is every
        event of a burst, and the library's models would cost more than the JSON."""
        query = {
            "labelSelector": label_selector,
            "fieldSelector": field_selector,
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_seconds),
        }
        # A connection that goes silent (the apiserver gone) ends too, a while after the
        # apiserver's own end would have come.
        response = self._raw(_resource(resource).path(), query, (10, timeout_seconds + 30))
        try:
            with _unreachable_as_api_error():
                pending = b""
                for chunk in response.stream(1 << 16):
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        if line.strip():
                            yield _watch_event(json.loads(line))
        finally:
            response.release_conn()

    def _raw(self, path: str, query: dict[str, str], timeout: tuple[float, float]) -> Any:
        """GET ``path`` with this client's credentials, its body unread (a urllib3 response);
        an error status is an ApiError with the apiserver's message (GoneError for 410)."""
        method, url, headers, _, _ = self._client.param_serialize(
            "GET",
            path,
            query_params=[(k, v) for k, v in query.items() if v],
            header_params={"Accept": "application/json, */*", "User-Agent": self._client.user_agent},
            auth_settings=["BearerToken"],
        )
        with _unreachable_as_api_error():
            response = self._client.call_api(method, url, headers, _request_timeout=timeout).response
        if response.status >= 400:
            body = response.read(65536).decode(errors="replace")
            response.release_conn()
            message = body.strip() or str(response.reason)
            with contextlib.suppress(ValueError, AttributeError):
                message = str(json.loads(body).get("message") or message)
            kind = {404: NotFoundError, 409: ConflictError, 410: GoneError}.get(response.status, ApiError)
            raise kind(response.status, message)
        return response

    def create(self, plural: str, namespace: str | None, body: Body) -> Body:
        if namespace is None:
            return dict(self._call(self._custom.create_cluster_custom_object, GROUP, VERSION, plural, body))
        return dict(
            self._call(self._custom.create_namespaced_custom_object, GROUP, VERSION, namespace, plural, body)
        )

    def patch(self, plural: str, namespace: str | None, name: str, patch: Body) -> Body:
        """A JSON merge patch of the object (metadata, spec)."""
        if namespace is None:
            return dict(
                self._call(self._custom.patch_cluster_custom_object, GROUP, VERSION, plural, name, patch)
            )
        return dict(
            self._call(
                self._custom.patch_namespaced_custom_object, GROUP, VERSION, namespace, plural, name, patch
            )
        )

    def patch_status(self, plural: str, namespace: str | None, name: str, patch: Body) -> Body:
        metrics.STATUS_WRITES.inc()
        if namespace is None:
            return dict(
                self._call(
                    self._custom.patch_cluster_custom_object_status, GROUP, VERSION, plural, name, patch
                )
            )
        return dict(
            self._call(
                self._custom.patch_namespaced_custom_object_status,
                GROUP,
                VERSION,
                namespace,
                plural,
                name,
                patch,
            )
        )

    def delete(self, plural: str, namespace: str, name: str) -> None:
        with contextlib.suppress(NotFoundError):
            self._call(self._custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, plural, name)

    # --- core objects ---------------------------------------------------------------------------

    def secret(self, namespace: str, name: str) -> Body:
        """A Secret (its data base64, as the API sends it). The controller's only: agents read
        no Secrets (sealing.py)."""
        return self._plain(self._call(self._core.read_namespaced_secret, name, namespace))

    def create_secret(self, namespace: str, body: Body) -> Body:
        with _unreachable_as_api_error():
            return self._plain(self._call(self._core.create_namespaced_secret, namespace, body))

    def config_map(self, namespace: str, name: str) -> Body:
        with _unreachable_as_api_error():
            return self._plain(self._call(self._core.read_namespaced_config_map, name, namespace))

    def api_service(self, name: str) -> Body:
        with _unreachable_as_api_error():
            return self._plain(self._call(self._registration.read_api_service, name))

    def api_service_ca(self, name: str) -> str | None:
        """The CA bundle an APIService names (PEM), or None when it names none or is missing."""
        try:
            bundle = (self.api_service(name).get("spec") or {}).get("caBundle")
        except NotFoundError:
            return None
        return base64.b64decode(bundle).decode() if bundle else None

    def patch_api_service(self, name: str, patch: Body) -> None:
        with _unreachable_as_api_error():
            self._call(self._registration.patch_api_service, name, patch)

    def stream(self, path: str, query: dict[str, str], timeout: float) -> Any:
        """GET ``path`` of the apiserver, its body unread: the urllib3 response (``read1``,
        ``release_conn``), for bodies that stream (an aggregated API's console). A silence of
        ``timeout`` is a read timeout; a long body is none."""
        return self._raw(path, query, (10, timeout))

    def node(self, name: str) -> Body:
        return self._plain(self._call(self._core.read_node, name))

    def patch_node(self, name: str, patch: Body) -> None:
        self._call(self._core.patch_node, name, patch)

    def create_event(self, namespace: str, event: Body) -> None:
        self._call(self._core.create_namespaced_event, namespace, event)

    def lease(self, namespace: str, name: str) -> Body | None:
        try:
            return self._plain(self._call(self._coordination.read_namespaced_lease, name, namespace))
        except NotFoundError:
            return None

    def create_lease(self, namespace: str, body: Body) -> Body:
        return self._plain(self._call(self._coordination.create_namespaced_lease, namespace, body))

    def replace_lease(self, namespace: str, name: str, body: Body) -> Body:
        """A PUT: with ``metadata.resourceVersion`` set, it fails with ConflictError if the lease
        changed since it was read."""
        return self._plain(self._call(self._coordination.replace_namespaced_lease, name, namespace, body))

    # --- who is calling us (the agent's console endpoint) --------------------------------------

    def review_token(self, token: str) -> Body | None:
        """The user a bearer token authenticates as (username, uid, groups, extra), or None when
        the apiserver does not accept it (a TokenReview)."""
        review = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token))
        status = self._call(self._auth.create_token_review, review).status
        if status is None or not status.authenticated or status.user is None:
            return None
        return self._plain(status.user)

    def review_access(
        self,
        user: Body,
        *,
        verb: str,
        group: str,
        resource: str,
        namespace: str,
        name: str,
        subresource: str | None = None,
    ) -> tuple[bool, str]:
        """Whether ``user`` (as review_token returned it) may ``verb`` that object, and the
        authorizer's reason (a SubjectAccessReview)."""
        return self._review(
            user,
            resource_attributes=client.V1ResourceAttributes(
                verb=verb,
                group=group,
                resource=resource,
                subresource=subresource,
                namespace=namespace,
                name=name,
            ),
        )

    def review_path(self, user: Body, *, verb: str, path: str) -> tuple[bool, str]:
        """Whether ``user`` may ``verb`` the non-resource URL ``path`` (``/metrics``), and the
        authorizer's reason: what the kubelet and kube-rbac-proxy ask of Prometheus."""
        return self._review(
            user, non_resource_attributes=client.V1NonResourceAttributes(verb=verb, path=path)
        )

    def _review(self, user: Body, **attributes: Any) -> tuple[bool, str]:
        """A SubjectAccessReview of ``user`` for ``attributes`` (resource or non-resource)."""
        review = client.V1SubjectAccessReview(
            spec=client.V1SubjectAccessReviewSpec(
                user=user.get("username"),
                uid=user.get("uid"),
                groups=user.get("groups"),
                extra=user.get("extra"),
                **attributes,
            )
        )
        status = self._call(self._authz.create_subject_access_review, review).status
        return bool(status.allowed), str(status.reason or "")

    def bearer_token(self) -> str | None:
        """The bearer token this client sends (a kubeconfig's token, or one an exec or OIDC
        provider gave it), or None when it authenticates otherwise (a client certificate)."""
        configuration = self._client.configuration
        if configuration.refresh_api_key_hook is not None:
            configuration.refresh_api_key_hook(configuration)
        keys = configuration.api_key or {}
        value = str(keys.get("BearerToken") or keys.get("authorization") or "")  # by client version
        scheme, _, token = value.partition(" ")
        return token.strip() or None if scheme.lower() == "bearer" else None

    def version(self) -> str:
        """The apiserver's version: the cheapest request that proves it answers."""
        info = self._call(client.VersionApi(self._client).get_code)
        return str(info.git_version)


S = TypeVar("S", bound=BaseModel)
StatusUpdate = Callable[[S], S]


class StatusWriter(Generic[S]):
    """Writes one kind's status (and its labels, finalizers) with optimistic concurrency.

    The controller and the agent both write a VM's status, and a JSON merge patch replaces lists
    whole: a writer working from a stale copy would erase the other's conditions. So each write
    carries the resourceVersion it was computed from, and on a conflict the update is computed
    again from a fresh read. ``update`` maps the status as read (a model) to a model holding the
    fields to change (only the fields set on it are sent).
    """

    def __init__(self, kube: Kube, plural: str, model: type[S], cluster_scoped: bool = False) -> None:
        self.kube = kube
        self.plural = plural
        self.model = model
        self.cluster_scoped = cluster_scoped

    def _ns(self, body: Body) -> str | None:
        return None if self.cluster_scoped else str(body["metadata"]["namespace"])

    def status_of(self, body: Body) -> S:
        return self.model.model_validate(body.get("status") or {})

    def write(
        self,
        body: Body,
        update: StatusUpdate[S],
        attempts: int = 10,
        guard: Callable[[Body], bool] | None = None,
    ) -> Body | None:
        """Apply ``update`` to ``body``'s status. Returns the object as written, or None when it
        no longer exists (an object deleted meanwhile has no status to keep). With ``guard``, the
        object as read (again) must pass it, or nothing is written and it is returned as it is."""
        current = body
        name = str(body["metadata"]["name"])
        for attempt in range(attempts):
            if guard is not None and not guard(current):
                return current
            fields = to_wire(update(self.status_of(current)))
            patch = {
                "metadata": {"resourceVersion": current["metadata"]["resourceVersion"]},
                "status": fields,
            }
            try:
                return self.kube.patch_status(self.plural, self._ns(current), name, patch)
            except NotFoundError:
                return None
            except ConflictError:
                pass
            # Another writer got there first (the other process, another agent): back off a
            # little, with jitter, so two writers do not keep colliding in lockstep.
            time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 - jitter, not crypto
            fresh = self.get_or_none(self._ns(current), name)
            if fresh is None:
                return None
            current = fresh
        raise RuntimeError(f"status of {self.plural} {name} kept changing under us")

    def get_or_none(self, namespace: str | None, name: str) -> Body | None:
        return self.kube.get_or_none(self.plural, namespace, name)

    def add_finalizer(self, body: Body, finalizer: str) -> None:
        self._edit_finalizers(body, lambda names: names if finalizer in names else [*names, finalizer])

    def remove_finalizer(self, body: Body, finalizer: str) -> None:
        self._edit_finalizers(body, lambda names: [n for n in names if n != finalizer])

    def _edit_finalizers(self, body: Body, edit: Callable[[list[str]], list[str]]) -> None:
        """Change the finalizer list at the resourceVersion it was read at (a merge patch
        replaces the whole list, so another writer's change must not be lost)."""
        current: Body | None = body
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
                self.kube.patch(self.plural, self._ns(current), meta["name"], patch)
                return
            except NotFoundError:
                return
            except ConflictError:
                pass
            time.sleep(random.uniform(0, 0.05 * attempt))  # noqa: S311 - jitter, not crypto
            current = self.get_or_none(self._ns(current), meta["name"])
        raise RuntimeError(f"finalizers of {body['metadata']['name']} kept changing under us")

    def patch_at_version(self, body: Body, metadata: Body) -> Body | None:
        """Patch ``metadata`` (labels, finalizers, owners) only if the object is still at
        ``body``'s resourceVersion. None when it changed meanwhile or is gone: re-read and decide
        again."""
        meta = body["metadata"]
        patch = {"metadata": {**metadata, "resourceVersion": meta["resourceVersion"]}}
        try:
            return self.kube.patch(self.plural, self._ns(body), meta["name"], patch)
        except (NotFoundError, ConflictError):
            return None


class EventRecorder:
    """Posts Kubernetes Events, the `kubectl describe` story, from a background thread: the work
    an event reports on never waits for it, and failing to post one never fails the work."""

    def __init__(self, kube: Kube, component: str, host: str | None = None) -> None:
        self.kube = kube
        self.component = component
        self.host = host
        self._pool = ThreadPoolExecutor(max_workers=2, thread_name_prefix="events")

    def post(self, body: Body, kind: str, reason: str, message: str, type_: str = "Normal") -> None:
        self._pool.submit(self._post, body, kind, reason, message, type_)

    def _post(self, body: Body, kind: str, reason: str, message: str, type_: str) -> None:
        meta = body["metadata"]
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        event = {
            "metadata": {"generateName": f"{meta['name']}.", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": body.get("apiVersion"),
                "kind": kind,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta.get("uid"),
                "resourceVersion": meta.get("resourceVersion"),
            },
            "reason": reason,
            "message": message[:1024],
            "type": type_,
            "source": {"component": self.component, "host": self.host},
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        metrics.EVENTS.labels(reason).inc()
        try:
            self.kube.create_event(meta["namespace"], event)
        except ApiError as exc:
            log.warning("cannot post event %s for %s/%s: %s", reason, meta["namespace"], meta["name"], exc)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
