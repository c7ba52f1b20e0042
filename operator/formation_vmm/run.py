"""Start the controller or the agent: settings in, a kopf operator plus the health server out."""

import asyncio
import logging
from typing import Any

import kopf
from aiohttp import web

from formation_vmm import health
from formation_vmm.agent import debug_api
from formation_vmm.agent import handlers as agent_handlers
from formation_vmm.agent.handlers import AgentMemo
from formation_vmm.agent.hypervisor import Hypervisor, start_event_loop
from formation_vmm.agent.image_status import ImageStatusReporter
from formation_vmm.agent.inputs import ClusterInputs, ImageCatalog, secret_authorization
from formation_vmm.agent.reconcile import Reconciler
from formation_vmm.agent.snapshots import Snapshots
from formation_vmm.agent.sync import VmSync
from formation_vmm.agent.watch import VmCache
from formation_vmm.api.names import (
    GROUP,
    IMAGE_PLURAL,
    RESTORE_KIND,
    RESTORE_PLURAL,
    SNAPSHOT_KIND,
    SNAPSHOT_PLURAL,
    VERSION,
    VM_PLURAL,
)
from formation_vmm.config import Settings
from formation_vmm.controller import handlers as controller_handlers
from formation_vmm.controller.binder import Binder
from formation_vmm.controller.handlers import ControllerMemo
from formation_vmm.controller.image_guard import ImageGuard
from formation_vmm.controller.snapshot_notes import SnapshotNotes
from formation_vmm.domain.layout import NodeLayout
from formation_vmm.images.fetch import FetchLimits
from formation_vmm.images.node import NodeImages
from formation_vmm.kube import (
    EventRecorder,
    StatusWriter,
    core_api,
    custom_api,
    ensure_cluster_peering,
    vm_bound_here,
)

PEERING_NAME = "formation-vmm-controller"


def _logging(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True
    )
    # kopf logs every handler call at INFO; keep those at DEBUG unless asked for.
    if settings.log_level != "DEBUG":
        logging.getLogger("kopf").setLevel(logging.WARNING)


async def _serve(
    settings: Settings,
    registry: kopf.OperatorRegistry,
    state: object,
    *,
    standalone: bool,
    peering_name: str | None,
    routes: list[web.RouteDef] | None = None,
) -> None:
    ready = asyncio.Event()
    app = health.build_app(lambda: None if ready.is_set() else "the operator is starting", routes)
    runner = await health.serve(app, settings.api_host, settings.api_port)
    try:
        await kopf.operator(
            registry=registry,
            memo=kopf.Memo(state=state),
            standalone=standalone,
            peering_name=peering_name,
            clusterwide=not settings.namespaces,
            namespaces=settings.namespaces,
            ready_flag=ready,
        )
    finally:
        await runner.cleanup()


def _registry() -> kopf.OperatorRegistry:
    """A registry of our own (two operators live in one package), with kopf's login through the
    kubernetes client: in-cluster service account, else the kubeconfig."""
    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_via_client)
    return registry


def _vm_status_writer() -> StatusWriter:
    return StatusWriter(custom_api(), GROUP, VERSION, VM_PLURAL)


def run_controller(settings: Settings) -> None:
    _logging(settings)
    registry = _registry()
    controller_handlers.register(registry)
    core = core_api()
    binder = Binder(
        _vm_status_writer(),
        EventRecorder(core, "formation-vmm-controller"),
        settings.cpu_overcommit,
        settings.memory_overcommit,
        settings.node_lost_seconds,
    )
    custom = custom_api()

    def list_vms(namespace: str) -> list[dict[str, Any]]:
        found: Any = custom.list_namespaced_custom_object(GROUP, VERSION, namespace, VM_PLURAL)
        return list(found.get("items") or [])

    guard = ImageGuard(
        StatusWriter(custom, GROUP, VERSION, IMAGE_PLURAL),
        EventRecorder(core, "formation-vmm-controller"),
        list_vms,
    )
    notes = SnapshotNotes(
        _vm_status_writer(),
        {
            SNAPSHOT_KIND: StatusWriter(custom, GROUP, VERSION, SNAPSHOT_PLURAL),
            RESTORE_KIND: StatusWriter(custom, GROUP, VERSION, RESTORE_PLURAL),
        },
    )
    state = ControllerMemo(settings=settings, binder=binder, guard=guard, notes=notes)
    ensure_cluster_peering(custom_api(), PEERING_NAME)
    asyncio.run(_serve(settings, registry, state, standalone=False, peering_name=PEERING_NAME))


def run_agent(settings: Settings) -> None:
    _logging(settings)
    if not settings.node_name:
        raise SystemExit("the agent needs its node's name: set VMM_NODE_NAME or --node-name")
    node = settings.node_name
    registry = _registry()
    agent_handlers.register(registry, node)
    start_event_loop()  # before any libvirt connection opens, so lifecycle events arrive
    hypervisor = Hypervisor(settings.libvirt_uri)
    layout = NodeLayout(vm_dir=settings.vm_dir, disks_dir=settings.disks_dir, images_dir=settings.images_dir)
    core, custom = core_api(), custom_api()
    images = ImageCatalog()
    node_images = NodeImages(
        node,
        layout,
        FetchLimits(
            settings.image_max_bytes,
            settings.image_connect_timeout_seconds,
            settings.image_read_timeout_seconds,
        ),
        ImageStatusReporter(StatusWriter(custom, GROUP, VERSION, IMAGE_PLURAL), node),
        secret_authorization(core),
        retry_seconds=settings.image_retry_seconds,
        progress_seconds=settings.image_progress_seconds,
        workers=settings.image_workers,
    )
    reconciler = Reconciler(
        hypervisor, layout, settings.domain_type, ClusterInputs(custom, core, node_images, images)
    )
    events = EventRecorder(core, "formation-vmm-agent", node)
    sync = VmSync(reconciler, _vm_status_writer(), events, node)
    cache = VmCache()
    snapshots = Snapshots(
        node,
        hypervisor,
        layout,
        sync,
        cache,
        StatusWriter(custom, GROUP, VERSION, SNAPSHOT_PLURAL),
        StatusWriter(custom, GROUP, VERSION, RESTORE_PLURAL),
        events,
    )
    state = AgentMemo(
        settings=settings,
        node=node,
        hypervisor=hypervisor,
        sync=sync,
        api=core,
        vm_exists=vm_bound_here(custom, node),
        endpoint=settings.advertise_url or f"http://{node}:{settings.api_port}",
        images=images,
        node_images=node_images,
        cache=cache,
        snapshots=snapshots,
    )
    # The agent is one per node and owns only its node's VMs: no peering between agents.
    routes = debug_api.routes(hypervisor, layout)
    asyncio.run(_serve(settings, registry, state, standalone=True, peering_name=None, routes=routes))
