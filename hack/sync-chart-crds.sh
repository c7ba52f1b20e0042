#!/usr/bin/env bash
# crds/ is the one canonical copy; the chart's copy is generated from it (Helm installs
# charts/<chart>/crds/ before the templates). tests/api/test_crds.py checks the two match.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f charts/formation-vmm/crds/*.yaml
for f in crds/*.yaml; do
  [[ "$(basename "$f")" == kustomization.yaml ]] && continue
  cp "$f" charts/formation-vmm/crds/
done
