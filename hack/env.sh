# Sourced by hack/dev-up and hack/test: make this machine have what Formation VMM needs, then
# export VMM_BIN_DIR. Installs system packages (as root), starts libvirtd, builds the Python
# environment in .venv and the control-plane binaries (cached outside the clone).
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

if [[ $(id -u) -eq 0 ]]; then
  bash hack/install-system-deps.sh
  bash hack/setup-libvirt.sh
else
  bash hack/install-system-deps.sh || echo "env: continuing without the missing packages" >&2
fi

# The venv is rebuilt when pyproject.toml changes (a stamp holds its hash).
stamp=".venv/.pyproject.sha256"
want=$(sha256sum pyproject.toml | cut -d' ' -f1)
if [[ ! -x .venv/bin/python || "$(cat "$stamp" 2>/dev/null)" != "$want" ]]; then
  echo "env: installing Python dependencies into .venv" >&2
  python3 -m venv .venv
  .venv/bin/pip install -q --upgrade pip
  .venv/bin/pip install -q -e '.[test]'
  echo "$want" > "$stamp"
fi
export PATH="$REPO/.venv/bin:$PATH"

VMM_BIN_DIR="$(bash hack/control-plane-bins.sh)"
export VMM_BIN_DIR
export PATH="$VMM_BIN_DIR:$PATH"
