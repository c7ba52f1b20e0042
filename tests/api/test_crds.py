"""The CRDs in crds/ against the pydantic models, and the chart's copy against crds/."""

import datetime
from pathlib import Path
from types import NoneType, UnionType
from typing import Any, Literal, Union, get_args, get_origin

import pytest
import yaml
from pydantic import BaseModel

from formation_vmm.api import models

pytestmark = pytest.mark.pure

ROOT = Path(__file__).resolve().parents[2]
CRDS = ROOT / "crds"


def load_schema(plural: str) -> dict[str, Any]:
    doc = yaml.safe_load((CRDS / f"vmm.formation.cloud_{plural}.yaml").read_text())
    return doc["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def _strip_optional(annotation: Any) -> Any:
    if get_origin(annotation) in (Union, UnionType):
        args = [a for a in get_args(annotation) if a is not NoneType]
        if len(args) == 1:
            return args[0]
    return annotation


def _openapi_type(annotation: Any) -> str:
    ann = _strip_optional(annotation)
    origin = get_origin(ann)
    if origin is list:
        return "array"
    if origin is dict:
        return "object"
    if origin is Literal:
        return "string"
    if isinstance(ann, type) and issubclass(ann, BaseModel):
        return "object"
    return {str: "string", int: "integer", bool: "boolean", float: "number", datetime.datetime: "string"}[ann]


def compare(model: type[BaseModel], schema: dict[str, Any], path: str, problems: list[str]) -> None:
    props = schema.get("properties", {})
    fields = {(f.alias or name): f for name, f in model.model_fields.items()}
    for wire in sorted(set(fields) - set(props) - {"apiVersion", "kind"}):
        problems.append(f"{path}.{wire} is in the model but not in the CRD")
    for wire in sorted(set(props) - set(fields) - {"apiVersion", "kind", "metadata"}):
        problems.append(f"{path}.{wire} is in the CRD but not in the model")
    for wire, field in fields.items():
        if wire not in props or wire == "metadata":
            continue
        prop = props[wire]
        expected = _openapi_type(field.annotation)
        if prop.get("type") != expected:
            problems.append(f"{path}.{wire}: CRD type {prop.get('type')} but model type {expected}")
        if "description" not in prop:
            problems.append(f"{path}.{wire} has no description in the CRD")
        literal = _strip_optional(field.annotation)
        if get_origin(literal) is Literal and sorted(get_args(literal)) != sorted(prop.get("enum", [])):
            problems.append(f"{path}.{wire}: enum {prop.get('enum')} but model allows {get_args(literal)}")
        if field.default not in (None, ...) and "default" in prop and prop["default"] != field.default:
            problems.append(f"{path}.{wire}: CRD default {prop['default']!r}, model {field.default!r}")
        inner = _strip_optional(field.annotation)
        if get_origin(inner) is list:
            item = get_args(inner)[0]
            if isinstance(item, type) and issubclass(item, BaseModel):
                compare(item, prop["items"], f"{path}.{wire}[]", problems)
        elif isinstance(inner, type) and issubclass(inner, BaseModel):
            compare(inner, prop, f"{path}.{wire}", problems)


@pytest.mark.parametrize(
    ("plural", "model"),
    [
        ("virtualmachines", models.VirtualMachine),
        ("vmimages", models.VmImage),
        ("vmsnapshots", models.VmSnapshot),
        ("vmrestores", models.VmRestore),
        ("vmnetworks", models.VmNetwork),
        ("vmmigrations", models.VmMigration),
    ],
)
def test_models_mirror_the_crd_field_by_field(plural: str, model: type[BaseModel]) -> None:
    problems: list[str] = []
    compare(model, load_schema(plural), plural, problems)
    assert problems == []


def test_the_comparison_notices_a_missing_field() -> None:
    class Spec(models.ApiModel):
        memory: str = "512Mi"
        surprise: int = 0

    class Vm(models.ApiModel):
        spec: Spec

    problems: list[str] = []
    compare(Vm, load_schema("virtualmachines"), "vm", problems)
    assert "vm.spec.surprise is in the model but not in the CRD" in problems
    assert any("runStrategy is in the CRD but not in the model" in p for p in problems)


def test_every_crd_field_has_a_description() -> None:
    missing: list[str] = []

    def walk(schema: dict[str, Any], path: str) -> None:
        for name, prop in schema.get("properties", {}).items():
            if name != "metadata" and "description" not in prop:
                missing.append(f"{path}.{name}")
            walk(prop, f"{path}.{name}")
        if "items" in schema:
            walk(schema["items"], f"{path}[]")

    for crd in sorted(CRDS.glob("*_*.yaml")):
        for doc in yaml.safe_load_all(crd.read_text()):
            for version in doc["spec"]["versions"]:
                walk(version["schema"]["openAPIV3Schema"], crd.name)
    assert missing == []


# JSONSchemaProps, as apiextensions.k8s.io/v1 knows it. A key outside it is dropped by the
# apiserver without a word: `{description: Why, when it failed.}` in YAML's flow style was the
# description "Why" and a stray key "when it failed." (found by the chart upgrade test).
SCHEMA_KEYS = {
    "type", "description", "properties", "items", "required", "enum", "format", "pattern", "default",
    "minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minLength", "maxLength",
    "minItems", "maxItems", "uniqueItems", "minProperties", "maxProperties", "nullable", "title",
    "additionalProperties", "anyOf", "oneOf", "allOf", "not", "example", "externalDocs",
    "x-kubernetes-preserve-unknown-fields", "x-kubernetes-int-or-string",
    "x-kubernetes-embedded-resource", "x-kubernetes-list-type", "x-kubernetes-list-map-keys",
    "x-kubernetes-map-type", "x-kubernetes-validations",
}  # fmt: skip


def test_every_schema_node_has_only_keys_kubernetes_knows() -> None:
    stray: list[str] = []

    def walk(schema: dict[str, Any], path: str) -> None:
        stray.extend(f"{path}: {key!r}" for key in set(schema) - SCHEMA_KEYS)
        for name, prop in schema.get("properties", {}).items():
            walk(prop, f"{path}.{name}")
        if isinstance(schema.get("items"), dict):
            walk(schema["items"], f"{path}[]")
        if isinstance(schema.get("additionalProperties"), dict):
            walk(schema["additionalProperties"], f"{path}{{}}")

    for crd in sorted(CRDS.glob("*_*.yaml")):
        for doc in yaml.safe_load_all(crd.read_text()):
            for version in doc["spec"]["versions"]:
                walk(version["schema"]["openAPIV3Schema"], crd.name)
    assert stray == []


def test_the_chart_carries_the_same_crds() -> None:
    chart = ROOT / "charts" / "formation-vmm" / "crds"
    ours = {p.name: p.read_text() for p in CRDS.glob("*.yaml") if p.name != "kustomization.yaml"}
    theirs = {p.name: p.read_text() for p in chart.glob("*.yaml")}
    assert theirs == ours, "charts/formation-vmm/crds differs from crds/: run hack/sync-chart-crds.sh"


def test_printer_columns_are_the_contract() -> None:
    doc = yaml.safe_load((CRDS / "vmm.formation.cloud_virtualmachines.yaml").read_text())
    columns = [c["name"] for c in doc["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["Phase", "Node", "IP", "CPUs", "Memory", "Ready", "Age"]


def test_migration_columns_are_the_contract() -> None:
    doc = yaml.safe_load((CRDS / "vmm.formation.cloud_vmmigrations.yaml").read_text())
    columns = [c["name"] for c in doc["spec"]["versions"][0]["additionalPrinterColumns"]]
    assert columns == ["VM", "Source", "Target", "Phase", "Progress", "Age"]
    assert doc["spec"]["names"]["shortNames"] == ["vmmig"]
