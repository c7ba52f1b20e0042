# Sourced by hack/dev-up and hack/test: make this machine have what Formation VMM needs.
#   ensure_system  Debian packages (as root; a no-op when all are there)
#   ensure_venv    .venv with the project and its test tools, rebuilt when pyproject.toml changes
#   ensure_bins    the control-plane binaries, built once and cached outside the clone; exports
#                  VMM_BIN_DIR and puts them on PATH
set -euo pipefail
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO"

ensure_system() {
  if [[ $(id -u) -eq 0 ]]; then
    bash hack/install-system-deps.sh
  else
    bash hack/install-system-deps.sh || echo "env: continuing without the missing packages" >&2
  fi
}

venv_ready() {
  [[ -x .venv/bin/python && "$(cat .venv/.pyproject.sha256 2>/dev/null)" == "$(sha256sum pyproject.toml | cut -d' ' -f1)" ]]
}

ensure_venv() {
  if ! venv_ready; then
    ensure_system  # libvirt-python builds against libvirt-dev
    echo "env: installing Python dependencies into .venv" >&2
    python3 -m venv .venv
    .venv/bin/pip install -q --upgrade pip
    .venv/bin/pip install -q -e '.[test]'
    sha256sum pyproject.toml | cut -d' ' -f1 > .venv/.pyproject.sha256
  fi
  export PATH="$REPO/.venv/bin:$PATH"
}

ensure_bins() {
  VMM_BIN_DIR="$(bash hack/control-plane-bins.sh)"
  export VMM_BIN_DIR
  export PATH="$VMM_BIN_DIR:$PATH"
}
