"""The chart's monitoring: the alerting rules pass `promtool check rules`, and fire when they
should and only then (`promtool test rules` on series we write); every vmm_* name the rules
and the dashboard use is one the controller or the agent exports."""

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import REGISTRY

import formation_vmm.metrics  # noqa: F401 - registers the process series
from formation_vmm.agent.vms.vm_metrics import ProbeCollector, VmLabels, families
from tests.support.binaries import binaries
from tests.support.helm import CHART, helm

pytestmark = pytest.mark.host

ENABLED = [
    "--set=monitoring.serviceMonitor.enabled=true",
    "--set=monitoring.prometheusRule.enabled=true",
    "--set=monitoring.dashboard.enabled=true",
]

# Series over time, as promtool's unit tests take them: a node lost for a while, a VM that runs
# but is not Ready, one that is Ready, an agent target that goes down.
RULE_TESTS = """
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'vmm_controller_lost_nodes{instance="c:3003"}'
        values: '0 0 1 1 1 1 1'
      - series: 'vmm_vm_ready{namespace="a", name="web", node="n1"}'
        values: '0x20'
      - series: 'vmm_vm_phase{namespace="a", name="web", node="n1", phase="Running"}'
        values: '1x20'
      - series: 'vmm_vm_ready{namespace="a", name="db", node="n1"}'
        values: '1x20'
      - series: 'vmm_vm_phase{namespace="a", name="db", node="n1", phase="Running"}'
        values: '1x20'
      - series: 'vmm_vm_ready{namespace="a", name="off", node="n1"}'
        values: '0x20'
      - series: 'vmm_vm_phase{namespace="a", name="off", node="n1", phase="Running"}'
        values: '0x20'
      - series: 'up{job="vmm-metrics", app_kubernetes_io_component="agent", instance="n1:3003"}'
        values: '1 1 0 0 0 0 0 0 0'
      - series: 'vmm_vm_probe_passing{namespace="a", name="web", node="n1", probe="liveness"}'
        values: '1 1 0 0 0 0 0 0 0 0'
      - series: 'vmm_vm_probe_passing{namespace="a", name="db", node="n1", probe="readiness"}'
        values: '1x10'
    alert_rule_test:
      - {eval_time: 6m, alertname: FormationVmmVmProbeFailing, exp_alerts: []}
      - eval_time: 8m
        alertname: FormationVmmVmProbeFailing
        exp_alerts:
          - exp_labels: {severity: warning, namespace: a, name: web, node: n1, probe: liveness}
            exp_annotations:
              summary: "The liveness probe of VM a/web fails"
              description: "kubectl describe vm -n a web shows the probe's last answer."
      - {eval_time: 3m, alertname: FormationVmmNodeLost, exp_alerts: []}
      - eval_time: 5m
        alertname: FormationVmmNodeLost
        exp_alerts:
          - exp_labels: {severity: critical}
            exp_annotations:
              summary: "1 hypervisor node(s) stopped reporting"
              description: >-
                Their VMs are Unknown; see kubectl get nodes -l vmm.formation.cloud/hypervisor=true.
      - {eval_time: 9m, alertname: FormationVmmVmNotReady, exp_alerts: []}
      - eval_time: 11m
        alertname: FormationVmmVmNotReady
        exp_alerts:
          - exp_labels: {severity: warning, namespace: a, name: web, node: n1}
            exp_annotations:
              summary: "VM a/web runs but is not Ready"
              description: "kubectl describe vm -n a web says why."
      - {eval_time: 4m, alertname: FormationVmmAgentDown, exp_alerts: []}
      - eval_time: 8m
        alertname: FormationVmmAgentDown
        exp_alerts:
          - exp_labels:
              severity: critical
              job: vmm-metrics
              app_kubernetes_io_component: agent
              instance: "n1:3003"
            exp_annotations:
              summary: "Formation VMM agent n1:3003 is down"
              description: "Its node's VMs keep running, but nothing reconciles them or reports their state."
"""


def rendered() -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(helm("template", "vmm", str(CHART), *ENABLED)) if d]


def of_kind(kind: str, name: str | None = None) -> dict[str, Any]:
    [doc] = [d for d in rendered() if d["kind"] == kind and name in (None, d["metadata"]["name"])]
    return doc


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(binaries() / "promtool"), *args], capture_output=True, text=True, cwd=cwd, check=False
    )


def exported() -> set[str]:
    """Every series name the processes can export: the registered families, and the agent's
    per-VM families as a QEMU domain with a disk and an interface yields them."""
    names = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [])
        names.update(family.name + suffix for suffix in suffixes)
    stats = {"cpu.time": 1, "vcpu.current": 1, "balloon.current": 1, "balloon.maximum": 1}
    stats |= {"balloon.rss": 1, "balloon.unused": 1, "block.count": 1, "net.count": 1}
    stats |= {
        f"block.0.{k}": 1
        for k in ("rd.bytes", "wr.bytes", "rd.reqs", "wr.reqs", "fl.reqs", "rd.times", "wr.times")
    }
    stats |= {f"net.0.{d}.{k}": 1 for d in ("rx", "tx") for k in ("bytes", "pkts", "errs", "drop")}
    for family in families([("d", stats)], {"d": VmLabels("a", "b", "Running", ("eth0",))}, "n"):
        names.update(sample.name for sample in family.samples)
    probes = ProbeCollector(
        lambda: {"d": {"readiness": True}}, lambda: {"d": VmLabels("a", "b", "Running")}, "n"
    )
    names.update(sample.name for family in probes.collect() for sample in family.samples)
    return names | {"vmm_vm_stats_up"}


def used(expr: str) -> set[str]:
    return set(re.findall(r"\bvmm_[a-z_]+\b", expr))


def test_the_alerting_rules_are_valid_and_fire_when_they_should(tmp_path: Path) -> None:
    rule = of_kind("PrometheusRule")
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    checked = promtool("check", "rules", "rules.yaml", cwd=tmp_path)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    (tmp_path / "tests.yaml").write_text(RULE_TESTS)
    tested = promtool("test", "rules", "tests.yaml", cwd=tmp_path)
    assert tested.returncode == 0, tested.stdout + tested.stderr


def test_rules_and_dashboard_use_only_series_we_export() -> None:
    names = exported()
    rule = of_kind("PrometheusRule")
    exprs = [r["expr"] for group in rule["spec"]["groups"] for r in group["rules"]]
    dashboard = json.loads(of_kind("ConfigMap", "vmm-dashboard")["data"]["formation-vmm.json"])
    exprs += [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    exprs += [v["definition"] for v in dashboard["templating"]["list"] if "definition" in v]
    assert len(exprs) > 10
    unknown = {name for expr in exprs for name in used(expr)} - names
    assert not unknown, f"not exported by any process: {sorted(unknown)}"


def test_monitoring_is_off_unless_asked_for() -> None:
    kinds = {d["kind"] for d in yaml.safe_load_all(helm("template", "vmm", str(CHART))) if d}
    assert not kinds & {"ServiceMonitor", "PrometheusRule"}
    service_monitor = of_kind("ServiceMonitor")
    assert service_monitor["spec"]["podTargetLabels"] == ["app.kubernetes.io/component"]
