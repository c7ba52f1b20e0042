#!/usr/bin/env bash
# crds/ is the one canonical copy; the chart's copy is generated from it (Helm installs
# charts/<chart>/crds/ before the templates). tests/api/test_crds.py checks the two match.
set -euo pipefail
cd "$(dirname "$0")/.."
rm -f charts/formation-vmm/crds/*.yaml
cp crds/*.yaml charts/formation-vmm/crds/
