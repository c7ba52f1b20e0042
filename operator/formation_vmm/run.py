"""Start the controller or the agent: settings in, every component built once and handed to the
next by its constructor, a kopf operator plus the HTTP server out."""

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Callable, Coroutine
from typing import Any

import kopf
from aiohttp import web
from prometheus_client import REGISTRY

from formation_vmm import health as health_http
from formation_vmm import metrics
from formation_vmm.access import CallerAccess
from formation_vmm.agent import handlers as agent_handlers
from formation_vmm.agent.handlers import AgentMemo, access_annotation, migration_endpoint
from formation_vmm.agent.hypervisor import Hypervisor, start_event_loop
from formation_vmm.agent.hypervisor import migration as libvirt_migration
from formation_vmm.agent.hypervisor.guest_agent import guest_ping
from formation_vmm.agent.hypervisor.networks import HypervisorNetworks
from formation_vmm.agent.hypervisor.nwfilters import HypervisorFilters
from formation_vmm.agent.image_status import ImageStatusReporter
from formation_vmm.agent.migration.migration_calls import MigrationCalls
from formation_vmm.agent.migration.migrations import Endpoint, NodeMigrations, Tuning
from formation_vmm.agent.migration.peer_certificates import PeerCertificates
from formation_vmm.agent.migration.relay import Identity, Relay, Stream, socket_owner
from formation_vmm.agent.migration.relay_access import RelayAccess
from formation_vmm.agent.networks.node_guard import NodeGuard
from formation_vmm.agent.networks.node_networks import NodeNetworks
from formation_vmm.agent.probes.prober import Prober
from formation_vmm.agent.serving import controller_api, debug_api
from formation_vmm.agent.snapshots.node_snapshots import Snapshots
from formation_vmm.agent.snapshots.snapshot_index import BY_VM, counter, vm_of
from formation_vmm.agent.vms import confinement_check, qemu_user
from formation_vmm.agent.vms.echoes import Echoes
from formation_vmm.agent.vms.inputs import ClusterInputs, ImageCatalog, image_authorization
from formation_vmm.agent.vms.migration_marks import MigrationMarks
from formation_vmm.agent.vms.reconcile import Reconciler
from formation_vmm.agent.vms.sync import VmSync
from formation_vmm.agent.vms.vm_controller import VmCache, VmController, bound_here
from formation_vmm.agent.vms.vm_metrics import ProbeCollector, VmStatsCollector
from formation_vmm.api.models import (
    VirtualMachineStatus,
    VmImageStatus,
    VmMigrationStatus,
    VmNetworkStatus,
    VmRestoreStatus,
    VmSnapshotStatus,
)
from formation_vmm.api.names import (
    HYPERVISOR_LABEL,
    IMAGE_PLURAL,
    MIGRATION_PLURAL,
    NETWORK_PLURAL,
    NODE_LABEL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VM_KIND,
    VM_PLURAL,
    agent_finalizer,
)
from formation_vmm.config import Settings
from formation_vmm.controller import handlers as controller_handlers
from formation_vmm.controller.binding.binder import Binder
from formation_vmm.controller.binding.nodes import Ceiling
from formation_vmm.controller.handlers import ControllerMemo
from formation_vmm.controller.image_guard import HELD, ImageGuard, held
from formation_vmm.controller.leader import LeaderElector
from formation_vmm.controller.moves.drain import Drainer
from formation_vmm.controller.moves.lost_nodes import LostNodes
from formation_vmm.controller.moves.migrations import MigrationScheduler
from formation_vmm.controller.sealer import Sealer, Seen
from formation_vmm.controller.serving import subresources
from formation_vmm.controller.snapshot_notes import SnapshotNotes
from formation_vmm.controller.vm_facts import INDEXERS as VM_INDEXERS
from formation_vmm.controller.vm_facts import vm_facts
from formation_vmm.controller.vm_feed import VmFeed
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.domain.spec import NodeFirmware
from formation_vmm.health import Health, within
from formation_vmm.host.paths import AlreadyRunningError, hold_lock
from formation_vmm.images.collector import GarbageCollector
from formation_vmm.images.egress import EgressPolicy
from formation_vmm.images.fetch import FetchLimits
from formation_vmm.images.node import NodeImages
from formation_vmm.informer import WATCH_SECONDS, Informer
from formation_vmm.kube import ApiError, EventRecorder, Kube, Resource, StatusWriter, load_config
from formation_vmm.migration_rules import Limits
from formation_vmm.sealing import NodeKey
from formation_vmm.waiting import WaitTimeoutError, wait_for
from formation_vmm.workqueue import WorkQueue

log = logging.getLogger(__name__)

LEASE_NAME = "formation-vmm-controller"
# Each process's name to the apiserver: the source of its events and the manager of its fields.
CONTROLLER = "formation-vmm-controller"
AGENT = "formation-vmm-agent"


def _start(settings: Settings, component: str) -> Kube:
    """What both processes do first: logging, the replaced service's settings, WAIT_FOR, the
    API client (``component`` names it to the apiserver, and in the events it posts)."""
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # kopf logs every handler call at INFO; keep those at DEBUG unless asked for.
    if settings.log_level != "DEBUG":
        logging.getLogger("kopf").setLevel(logging.WARNING)
    if settings.state_url:
        log.warning(
            "VMM_STATE_URL=%s is ignored: the Kubernetes API server holds all state now", settings.state_url
        )
    if settings.wait_for:
        try:
            wait_for(settings.wait_for, settings.wait_for_timeout_seconds)
        except WaitTimeoutError as exc:
            raise SystemExit(str(exc)) from exc
    load_config()
    return Kube(user_agent=component)


async def _serve(
    settings: Settings,
    registry: kopf.OperatorRegistry,
    state: object,
    health: Health,
    routes: list[web.RouteDef] | None = None,
    local_routes: list[web.RouteDef] | None = None,
    metrics_guard: health_http.MetricsGuard | None = None,
    background: list[Callable[[], Coroutine[Any, Any, None]]] | None = None,
) -> None:
    ready = asyncio.Event()
    runner = await health_http.serve(
        health_http.build_app(health, routes, metrics_guard), settings.api_host, settings.api_port
    )
    runners = [runner]
    if local_routes and settings.debug_port:
        # Loopback only, whatever api_host says: these show every tenant's VMs and consoles.
        local = web.Application()
        local.add_routes(local_routes)
        runners.append(await health_http.serve(local, "127.0.0.1", settings.debug_port))

    async def started() -> None:
        await ready.wait()
        health.started.set()

    waiter = asyncio.create_task(started())
    # Servers and loops of their own (the controller's aggregated API, the agent's access port).
    # Each runs until kopf stops, and is cancelled then.
    others = [asyncio.create_task(each(), name=each.__name__) for each in background or []]
    # A server that ended (it never should) restarts the process, rather than fail unseen.
    health.live_check(
        "servers",
        lambda: ", ".join(f"{t.get_name()} ended" for t in others if t.done()) or None,
    )
    try:
        await kopf.operator(
            registry=registry,
            memo=kopf.Memo(state=state),
            standalone=True,
            # kopf would otherwise name itself after the user, and the chart's controller runs
            # as a uid with no passwd entry (getpwuid fails): the pod's name or the host's.
            identity=_identity(),
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            ready_flag=ready,
        )
    finally:
        # kopf has stopped (SIGTERM, or a fatal error). Threads may still wait on requests to an
        # apiserver that does not answer, and asyncio.run() and the interpreter join them before
        # exiting: the deadline ends the process whatever they wait on. Every step they could be
        # cut off in is idempotent (the next process converges).
        _exit_after(settings.shutdown_seconds)
        waiter.cancel()
        for task in others:
            task.cancel()
        for each in runners:
            await each.cleanup()


def _identity() -> Any:
    """kopf's NewType Identity (not exported): a str."""
    return f"{os.environ.get('POD_NAME') or socket.gethostname()}/{os.getpid()}"


def _exit_after(seconds: float) -> None:
    def leave() -> None:
        log.warning("still exiting after %.0fs (threads wait on the API); leaving now", seconds)
        logging.shutdown()
        os._exit(0)

    timer = threading.Timer(seconds, leave)
    timer.daemon = True
    timer.start()


def _registry() -> kopf.OperatorRegistry:
    """A registry of our own (two operators live in one package), with kopf's login through the
    kubernetes client: in-cluster service account, else the kubeconfig."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return registry


def _tasks_alive(state: AgentMemo | ControllerMemo) -> str | None:
    dead = [t.get_name() for t in state.tasks if t.done()]
    return f"background loops ended: {', '.join(dead)}" if dead else None


def run_controller(settings: Settings) -> None:
    kube = _start(settings, CONTROLLER)
    registry = _registry()
    namespace = settings.controller_namespace
    controller_handlers.register(registry)
    events = EventRecorder(kube, CONTROLLER)
    vm_status = StatusWriter(kube, VM_PLURAL, VirtualMachineStatus)
    identity = os.environ.get("POD_NAME") or f"{socket.gethostname()}-{os.getpid()}"
    health = Health()
    # Readiness: the API answered the last lease round, and a lease renewal came back through
    # the watch, within three renewals.
    renew = settings.leader_renew_seconds
    health.pulse("api", 3 * renew, "the API answered the leader election")
    health.pulse("watch", 3 * renew + 5, "the lease watch delivered a renewal")
    health.pulse("loop", 3 * RETRY_BIND, "the binding loop ran")
    image_status = StatusWriter(kube, IMAGE_PLURAL, VmImageStatus)
    binder = Binder(
        vm_status,
        events,
        settings.cpu_overcommit,
        settings.memory_overcommit,
        settings.node_lost_seconds,
        ceiling=Ceiling(settings.node_max_cpus, settings.node_max_memory),
    )
    # The informers whose stores the sealer and the image guard read (their handlers are wired
    # with the rest in controller_handlers.informers; the VMs' here, below).
    seen = Seen(
        vms=Informer(
            kube,
            VM_PLURAL,
            transform=vm_facts,
            indexers=VM_INDEXERS,
            beat=lambda: health.beat("vm-watch"),
            name="vm-watch",
        ),
        nodes=Informer(kube, Resource("nodes", "", "v1"), label_selector=f"{HYPERVISOR_LABEL}=true"),
        images=Informer(kube, IMAGE_PLURAL, indexers={HELD: held}),
        migrations=Informer(kube, MIGRATION_PLURAL),
    )
    guard = ImageGuard(image_status, events, lambda ns: kube.list(VM_PLURAL, ns), seen.images)
    sealer = Sealer(kube, vm_status, image_status, events, seen, settings.seal_refresh_seconds)
    leader = LeaderElector(
        kube,
        namespace,
        LEASE_NAME,
        identity,
        settings.leader_lease_seconds,
        settings.leader_renew_seconds,
    )
    feed = VmFeed(binder, sealer, guard, leader.is_leader)
    state = ControllerMemo(
        settings=settings,
        kube=kube,
        binder=binder,
        migrations=MigrationScheduler(
            kube,
            binder,
            StatusWriter(kube, MIGRATION_PLURAL, VmMigrationStatus),
            vm_status,
            events,
            _migration_tuning(settings).limits,
        ),
        drainer=Drainer(kube, binder, events, settings.eviction_strategy),
        network_status=StatusWriter(kube, NETWORK_PLURAL, VmNetworkStatus, cluster_scoped=True),
        image_status=image_status,
        lost_nodes=LostNodes(kube, binder, events, settings.eviction_strategy),
        guard=guard,
        notes=SnapshotNotes(
            kube,
            StatusWriter(kube, SNAPSHOT_PLURAL, VmSnapshotStatus),
            StatusWriter(kube, RESTORE_PLURAL, VmRestoreStatus),
        ),
        sealer=sealer,
        leader=leader,
        health=health,
        vm_watch=seen.vms,
    )
    seen.vms.handler, seen.vms.changed = feed.event, feed.changed
    state.informers = controller_handlers.informers(state, namespace, LEASE_NAME, seen)
    _vm_watch_health(health, state.vm_watch)
    health.live_check("loops", lambda: _tasks_alive(state))

    async def aggregated_api() -> None:
        await subresources.run(kube, namespace, settings.subresources_host, settings.subresources_port)

    background = [aggregated_api] if settings.subresources_port else []
    asyncio.run(_serve(settings, registry, state, health, background=background))


RETRY_BIND = controller_handlers.RETRY_SECONDS


def _vm_watch_health(health: Health, watch: Informer) -> None:
    """Both processes' VM watch (informer.py, beating "vm-watch"): readiness needs a list or a
    watch request that ended well within two requests' time; liveness, its thread."""
    health.pulse("vm-watch", 2 * WATCH_SECONDS + 30, "the VM watch listed or ended a watch request well")
    health.live_check(
        "vm-watch",
        lambda: None if watch.alive() or not health.started.is_set() else "the VM watch's thread died",
    )


def _hold_agent_lock(settings: Settings, node: str) -> None:
    try:
        # One agent per node: two would each take the other's domains for orphans.
        hold_lock(settings.state_dir / "agent.lock")
    except AlreadyRunningError as exc:
        raise SystemExit(f"another agent runs on node {node} with these directories: {exc}") from exc


def run_agent(settings: Settings) -> None:
    kube = _start(settings, AGENT)
    if not settings.node_name:
        raise SystemExit("the agent needs its node's name: set VMM_NODE_NAME or --node-name")
    node = settings.node_name
    _hold_agent_lock(settings, node)
    registry = _registry()
    agent_handlers.register(registry)
    health = Health()
    layout = NodeLayout(
        vm_dir=settings.vm_dir,
        disks_dir=settings.disks_dir,
        images_dir=settings.images_dir,
        cache_dir=settings.image_cache_dir,
    )
    # The one work queue: each kind's keys in a lane of their own (workers start in handlers).
    queue = WorkQueue()
    vms = queue.lane(VM_KIND)
    cache = VmCache()
    # The informers whose stores the work reads (their handlers, which only queue keys, are
    # wired with the rest in agent_handlers.informers).
    images_seen = Informer(kube, IMAGE_PLURAL, name="watch-vmimages")
    snapshots_seen = Informer(kube, SNAPSHOT_PLURAL, name="watch-vmsnapshots", indexers={BY_VM: vm_of})
    restores_seen = Informer(kube, RESTORE_PLURAL, name="watch-vmrestores", indexers={BY_VM: vm_of})
    migrations_seen = Informer(kube, MIGRATION_PLURAL, name="watch-vmmigrations")
    images = ImageCatalog(images_seen)

    echoes = Echoes()

    def on_domain_event(name: str, event: str) -> None:  # from libvirt's event thread
        metrics.DOMAIN_EVENTS.labels(event).inc()
        if not echoes.is_echo(name, event):
            vms.add(name)

    def on_image_change(namespace: str, image: str) -> None:
        for key in cache.users_of(namespace, image):
            vms.add(key)

    # The key the controller seals this node's Secrets to (sealing.py), kept across restarts.
    key = NodeKey(settings.state_dir / "node.key")
    start_event_loop()  # before any libvirt connection opens, so lifecycle events arrive
    hypervisor = Hypervisor(settings.libvirt_uri, listener=on_domain_event)
    confinement_check.check(hypervisor, settings.allow_unconfined_qemu)
    node_images = NodeImages(
        node,
        layout,
        FetchLimits(
            settings.image_max_bytes,
            settings.image_connect_timeout_seconds,
            settings.image_read_timeout_seconds,
            settings.image_download_deadline_seconds,
            EgressPolicy.from_settings(settings.image_egress_allow, settings.image_egress_deny),
            settings.image_ca_file,
            settings.image_qemu_img_memory,
            settings.image_qemu_img_cpu_seconds,
        ),
        ImageStatusReporter(StatusWriter(kube, IMAGE_PLURAL, VmImageStatus), node),
        image_authorization(key, node),
        notify=on_image_change,
        retry_seconds=settings.image_retry_seconds,
        progress_seconds=settings.image_progress_seconds,
        workers=settings.image_workers,
        per_namespace=settings.image_workers_per_namespace,
        max_cache_bytes=settings.image_cache_max_bytes,
    )
    networks = NodeNetworks(
        HypervisorNetworks(hypervisor),
        StatusWriter(kube, NETWORK_PLURAL, VmNetworkStatus, cluster_scoped=True),
        node,
        cache.vms,
    )
    reconciler = Reconciler(
        hypervisor,
        layout,
        settings.domain_type,
        ClusterInputs(kube, node_images, images, key, node),
        networks=networks,
        echoes=echoes,
        qemu_gid=qemu_user.kvm_group(settings.qemu_group),
        qemu_uids=qemu_user.own_uids_possible(
            (settings.disks_dir, settings.vm_dir, settings.image_cache_dir)
        ),
        firmware=NodeFirmware(
            bios=settings.kernel_path,
            efi_code=settings.efi_code,
            efi_vars=settings.efi_vars,
            efi_secure_code=settings.efi_secure_code,
            efi_secure_vars=settings.efi_secure_vars,
        ),
    )
    events = EventRecorder(kube, AGENT, node)
    vm_status = StatusWriter(kube, VM_PLURAL, VirtualMachineStatus)
    prober = Prober.started(
        settings, lambda domain, timeout: guest_ping(hypervisor, domain, timeout), vms.add
    )
    # The agent's key and self-signed certificate: the relay's and the access port's.
    identity = Identity.load_or_create(settings.state_dir / "relay", node)
    sync = VmSync(
        reconciler,
        vm_status,
        events,
        node,
        settings.retry_seconds,
        prober,
        on_written=cache.written,
        snapshots=counter(snapshots_seen),
    )

    vm_controller = VmController(
        sync,
        hypervisor,
        cache,
        vms,
        bound_here(kube, node),
        vm_status,
        agent_finalizer(node),
        layout.vm_dir,
        MigrationMarks(settings.state_dir / "migrations"),
    )
    snapshots = Snapshots(
        node,
        hypervisor,
        layout,
        sync,
        cache,
        StatusWriter(kube, SNAPSHOT_PLURAL, VmSnapshotStatus),
        StatusWriter(kube, RESTORE_PLURAL, VmRestoreStatus),
        events,
        vms.add,
        seen={SNAPSHOT_KIND: snapshots_seen, RESTORE_KIND: restores_seen},
        lanes={SNAPSHOT_KIND: queue.lane(SNAPSHOT_KIND), RESTORE_KIND: queue.lane(RESTORE_KIND)},
    )
    relay = _relay(settings, kube, node, hypervisor, identity)
    guard = NodeGuard.started(settings, HypervisorFilters(hypervisor), relay, networks.gateways)
    migrations = NodeMigrations(
        node, kube, hypervisor, reconciler, sync, cache, vm_controller.marks,
        StatusWriter(kube, MIGRATION_PLURAL, VmMigrationStatus), vm_status, events, vms.add,
        migrations_seen, _migration_tuning(settings), relay=relay,
    )  # fmt: skip
    state = AgentMemo(
        settings=settings,
        node=node,
        access=access_annotation(settings, identity),
        kube=kube,
        hypervisor=hypervisor,
        queue=queue,
        vms=vms,
        cache=cache,
        vm_controller=vm_controller,
        images=images,
        snapshots_seen=snapshots_seen,
        node_images=node_images,
        collector=GarbageCollector(
            node_images, settings.image_gc_grace_seconds, settings.image_cache_max_bytes
        ),
        snapshots=snapshots,
        migrations=migrations,
        networks=networks,
        health=health,
        key=key,
        migration_endpoint=migration_endpoint(settings, relay),
        relay=relay,
        guard=guard,
        vm_watch=Informer(
            kube,
            VM_PLURAL,
            lambda kind, body: agent_handlers.vm_event(state, kind, body),
            label_selector=f"{NODE_LABEL}={node}",
            listed=vm_controller.forget_unlisted,
            beat=lambda: health.beat("vm-watch"),
            name="vm-watch",
        ),
    )
    state.informers = agent_handlers.informers(
        state, images_seen, snapshots_seen, restores_seen, migrations_seen
    )
    _agent_health(health, settings, hypervisor, state, queue, prober)
    # Per-VM series (vm_metrics.py): one bulk libvirt call per scrape.
    REGISTRY.register(VmStatsCollector(hypervisor.all_domain_stats, cache.labels, node))
    REGISTRY.register(ProbeCollector(prober.states, cache.labels, node))
    asyncio.run(
        _serve(
            settings,
            registry,
            state,
            health,
            routes=debug_api.public_routes(hypervisor, health),
            local_routes=debug_api.node_local_routes(hypervisor, layout, networks.libvirt),
            # Its series name every tenant's VMs: for Prometheus only (formation-vmm-metrics-reader).
            metrics_guard=CallerAccess(kube).metrics_refusal,
            background=controller_api.serving(settings, kube, hypervisor, layout, identity),
        )
    )


def _relay(
    settings: Settings, kube: Kube, node: str, hypervisor: Hypervisor, identity: Identity
) -> Relay | None:
    """The migration relay, started, when this node takes migrations through it."""
    if not settings.migration_relay_listen:
        return None
    host, _, port = settings.migration_relay_listen.rpartition(":")

    def published(peer: str) -> str | None:
        try:
            endpoint = Endpoint.of(kube.node(peer))
        except ApiError:
            return None
        return endpoint.certificate if endpoint is not None and endpoint.certificate else None

    # A connection names its node before TLS: looked up cached and rate-limited, never a Node
    # GET per connection.
    certificate = PeerCertificates(published)

    access = RelayAccess(kube, node, _migration_tuning(settings).limits)

    def calls(stream: Stream) -> MigrationCalls:
        domain = access.domain_of(stream)
        return MigrationCalls(domain, lambda: libvirt_migration.own_definition(hypervisor, domain))

    relay = Relay(
        node,
        identity,
        (host.strip("[]"), int(port)),
        settings.migration_relay_dir,
        settings.migration_relay_host_dir or settings.migration_relay_dir,
        settings.migration_libvirt_socket,
        access,
        certificate,
        socket_owner(settings.migration_relay_socket_owner),
        calls,
    )
    relay.start()
    return relay


def _agent_health(
    health: Health,
    settings: Settings,
    hypervisor: Hypervisor,
    state: AgentMemo,
    queue: WorkQueue,
    prober: Prober,
) -> None:
    """Readiness: the heartbeat reached the API, the Node watch showed it back, and libvirt
    answers; liveness: the sync workers, the background loops and the probe loop run."""
    beat = settings.heartbeat_seconds
    health.pulse("api", 3 * beat, "the heartbeat reached the API")
    health.pulse("watch", 3 * beat, "the Node watch delivered the heartbeat")
    _vm_watch_health(health, state.vm_watch)
    health.ready_check("libvirt", within(2.0, hypervisor.reachable))
    health.live_check("loops", lambda: _tasks_alive(state))
    health.live_check(
        "workers", lambda: None if queue.alive() or not health.started.is_set() else "queue workers died"
    )
    health.live_check("prober", lambda: None if prober.alive() else "the probe loop died")


def _migration_tuning(settings: Settings) -> Tuning:
    """The migration settings, as both processes use them (the controller its limits)."""
    limits = Limits(
        settings.migrations_in_cluster,
        settings.migrations_per_node,
        settings.migration_completion_timeout_per_gib,
        settings.migration_progress_timeout_seconds,
        settings.migrations_per_namespace,
    )
    return Tuning(
        limits,
        settings.migration_bandwidth_mib,
        settings.migration_auto_converge,
        direct=bool(settings.migration_libvirt_uri) and settings.migration_relay_listen is None,
    )
