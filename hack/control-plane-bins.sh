#!/usr/bin/env bash
# Provide kube-apiserver, kube-controller-manager, kube-scheduler, kubectl, kubelet, kube-proxy,
# etcd and helm for
# the tests and for `vmm dev up`, promtool (the chart's alerting rules are checked with it) and
# actionlint (the GitHub Actions workflow). Each binary is taken from $KUBEBUILDER_ASSETS or $PATH when one of the pinned
# version is there, else built from the Go module proxy and cached by version outside the clone.
#
# Usage: hack/control-plane-bins.sh            build what is missing, print the bin directory
#        hack/control-plane-bins.sh --dir      only print the bin directory (builds nothing)
#
# Why build: these binaries are not downloadable here; only the Go module proxy is reachable.
# k8s.io/kubernetes is not meant to be used as a module: its go.mod requires its staging modules
# at v0.0.0 and points them at ./staging with replace lines. A wrapper module replaces each of them
# with the published k8s.io/<name> v0.<minor>.<patch> that matches the release.
set -euo pipefail

K8S_VERSION="${VMM_K8S_VERSION:-v1.34.4}"
ETCD_VERSION="${VMM_ETCD_VERSION:-v3.6.16}"
HELM_VERSION="${VMM_HELM_VERSION:-v3.19.0}"
# Prometheus v3.16 as a Go module version; promtool sits beside the others, under its own name.
PROMETHEUS_VERSION="${VMM_PROMETHEUS_VERSION:-v0.316.0}"
# The GitHub Actions workflow is checked with it (it cannot run here).
ACTIONLINT_VERSION="${VMM_ACTIONLINT_VERSION:-v1.7.12}"

CACHE="${VMM_CACHE_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/formation-vmm}"
BIN="$CACHE/bin/k8s-$K8S_VERSION-etcd-$ETCD_VERSION-helm-$HELM_VERSION"

if [[ "${1:-}" == "--dir" ]]; then
  echo "$BIN"
  exit 0
fi

mkdir -p "$BIN"
log() { echo "control-plane-bins: $*" >&2; }

# A binary found on KUBEBUILDER_ASSETS or PATH is linked in only if it reports the pinned version:
# a different apiserver would make the tests test something else.
adopt() {
  local name="$1" want="$2" cand
  for cand in "${KUBEBUILDER_ASSETS:+$KUBEBUILDER_ASSETS/$name}" "$(command -v "$name" || true)"; do
    [[ -n "$cand" && -x "$cand" && "$cand" != "$BIN/$name" ]] || continue
    if "$cand" --version 2>/dev/null | grep -q -- "$want" \
      || "$cand" version 2>/dev/null | grep -q -- "$want"; then
      ln -sf "$cand" "$BIN/$name"
      log "using $cand"
      return 0
    fi
  done
  return 1
}

export GOFLAGS="${GOFLAGS:--buildvcs=false}"
export CGO_ENABLED=0

build_k8s() {
  local work="$CACHE/src/k8s-$K8S_VERSION"
  local staging="v0.${K8S_VERSION#v1.}"
  mkdir -p "$work"
  cd "$work"
  if [[ ! -f go.mod ]]; then
    log "preparing wrapper module for k8s.io/kubernetes $K8S_VERSION (staging $staging)"
    # The release's go.mod, from the module cache (go fetches it; no other tool needed, so this
    # runs before the Debian packages are installed).
    local modfile
    modfile=$(go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | python3 -c 'import json,sys; print(json.load(sys.stdin)["GoMod"])')
    {
      echo "module formation.cloud/vmm-k8s-bins"
      echo
      echo "go 1.24"
      echo
      echo "require k8s.io/kubernetes $K8S_VERSION"
      echo
      grep -E '^\s*k8s\.io/[a-z0-9-]+ => \./staging/' "$modfile" | awk -v v="$staging" '{print "replace " $1 " => " $1 " " v}'
    } > go.mod.tmp
    mv go.mod.tmp go.mod
  fi
  # Rewritten each time: a cache made before a binary was added learns of it here.
  cat > tools.go <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
	_ "k8s.io/kubernetes/cmd/kube-proxy"
	_ "k8s.io/kubernetes/cmd/kube-scheduler"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kubelet"
)
GO
  go mod tidy -e >/dev/null 2>&1 || go mod tidy
  local pkg="k8s.io/component-base/version"
  local minor="${K8S_VERSION#v1.}"; minor="${minor%%.*}"
  local ld="-s -w -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor"
  ld="$ld -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  ld="$ld -X k8s.io/client-go/pkg/version.gitVersion=$K8S_VERSION"
  local cmd
  for cmd in "$@"; do
    log "building $cmd $K8S_VERSION (cold: several minutes)"
    go build -trimpath -ldflags "$ld" -o "$BIN/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
    mv "$BIN/$cmd.tmp" "$BIN/$cmd"
  done
}

build_etcd() {
  local work="$CACHE/src/etcd-$ETCD_VERSION"
  mkdir -p "$work"
  cd "$work"
  if [[ ! -f main.go ]]; then
    cat > go.mod <<MOD
module formation.cloud/vmm-etcd

go 1.24

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
MOD
    cat > main.go <<'GO'
// Command etcd runs etcd's own entry point; the server module ships no main package.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() { etcdmain.Main(os.Args) }
GO
  fi
  go mod tidy
  log "building etcd $ETCD_VERSION"
  go build -trimpath -ldflags "-s -w" -o "$BIN/etcd.tmp" .
  mv "$BIN/etcd.tmp" "$BIN/etcd"
}

build_helm() {
  log "building helm $HELM_VERSION"
  local gobin
  gobin=$(mktemp -d)
  GOBIN="$gobin" go install -trimpath \
    -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
    "helm.sh/helm/v3/cmd/helm@$HELM_VERSION"
  mv "$gobin/helm" "$BIN/helm"
  rmdir "$gobin"
}

# `go install` of a command into the bin directory under a versioned name; more arguments go to
# go install before the module (build tags).
go_install() {
  local module="$1" name="$2" gobin
  shift 2
  log "building $name"
  gobin=$(mktemp -d)
  GOBIN="$gobin" go install -trimpath -ldflags "-s -w" "$@" "$module"
  mv "$gobin/$(basename "${module%@*}")" "$BIN/$name"
  rmdir "$gobin"
}

missing_k8s=()
for cmd in kube-apiserver kube-controller-manager kube-scheduler kubectl kubelet kube-proxy; do
  [[ -x "$BIN/$cmd" ]] || adopt "$cmd" "$K8S_VERSION" || missing_k8s+=("$cmd")
done
if ((${#missing_k8s[@]})); then build_k8s "${missing_k8s[@]}"; fi
[[ -x "$BIN/etcd" ]] || adopt etcd "${ETCD_VERSION#v}" || build_etcd
[[ -x "$BIN/helm" ]] || adopt helm "$HELM_VERSION" || build_helm
[[ -x "$BIN/promtool-$PROMETHEUS_VERSION" ]] ||
  go_install "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" "promtool-$PROMETHEUS_VERSION" \
    -tags remove_all_sd  # no service discovery (26 of them, with their clouds' SDKs): rules need none
ln -sf "promtool-$PROMETHEUS_VERSION" "$BIN/promtool"
[[ -x "$BIN/actionlint-$ACTIONLINT_VERSION" ]] ||
  go_install "github.com/rhysd/actionlint/cmd/actionlint@$ACTIONLINT_VERSION" "actionlint-$ACTIONLINT_VERSION"
ln -sf "actionlint-$ACTIONLINT_VERSION" "$BIN/actionlint"

echo "$BIN"
