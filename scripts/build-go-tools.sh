#!/usr/bin/env bash
# Builds the Go-based test-bed servers (kube-apiserver, kubectl, etcd, helm) and our Envoy config
# checker (standin/envoy-check) from the Go module proxy into a version-keyed cache outside the
# repo, so a second run is instant.
#
# usage: scripts/build-go-tools.sh [kube|etcd|helm|envoy-check|promtool|third-party-crds|oci-check|all]
#   envoy-check, oci-check and third-party-crds also print the path they made on stdout.
set -euo pipefail

K8S_VERSION="${K8S_VERSION:-v1.35.4}"
ETCD_VERSION="${ETCD_VERSION:-v3.5.35}"
HELM_VERSION="${HELM_VERSION:-v3.19.5}"
PROMETHEUS_VERSION="${PROMETHEUS_VERSION:-v0.316.0}"
KEDA_VERSION="${KEDA_VERSION:-v2.21.0}"
PROMETHEUS_OPERATOR_VERSION="${PROMETHEUS_OPERATOR_VERSION:-v0.85.0}"
ARGOCD_VERSION="${ARGOCD_VERSION:-v3.5.7}" # v3.6 needs Go 1.27
CACHE="${AIGW_CACHE:-$HOME/.cache/aigateway}"
export GOFLAGS=-mod=mod
export CGO_ENABLED=0

log() { printf '[build-go-tools] %s\n' "$*" >&2; }

# quiet LOG CMD...: run CMD with its chatter (one line per downloaded module) in LOG; show LOG
# only if CMD fails.
quiet() {
  local logfile=$1
  shift
  if ! "$@" >>"$logfile" 2>&1; then
    log "failed: $* (log: $logfile)"
    tail -n 40 "$logfile" >&2
    return 1
  fi
}

# Builds kube-apiserver and kubectl: k8s.io/kubernetes cannot be `go install`ed because its go.mod
# replaces the staging modules with local paths, so we generate a module that replaces each of them
# with the published v0.X.Y of the same release.
build_kube() {
  local out="$CACHE/kubernetes-$K8S_VERSION/bin"
  if [[ -x "$out/kube-apiserver" && -x "$out/kubectl" && -x "$out/kube-controller-manager" ]]; then return 0; fi
  rm -f "$out"/*
  local src="$CACHE/kubernetes-$K8S_VERSION/src"
  local minor="v0.${K8S_VERSION#v1.}"
  mkdir -p "$src" "$out"
  log "building kube-apiserver, kube-controller-manager and kubectl $K8S_VERSION (cold: several minutes)"
  local gomod
  gomod=$(cd "$src" && go mod download -json "k8s.io/kubernetes@$K8S_VERSION" | sed -n 's/.*"GoMod": "\(.*\)",/\1/p')
  [[ -f "$gomod" ]] || { log "could not download k8s.io/kubernetes@$K8S_VERSION"; return 1; }
  local gover
  gover=$(sed -n 's/^go \([0-9.]*\)$/\1/p' "$gomod" | head -1)
  {
    echo "module aigateway.local/testbed-kube"
    echo
    echo "go ${gover:-1.24}"
    echo
    echo "require k8s.io/kubernetes $K8S_VERSION"
    echo
    echo "replace ("
    sed -n 's#^[[:space:]]*\(k8s\.io/[^ ]*\) => \./staging/src/k8s\.io/[^ ]*$#\t\1 => \1 '"$minor"'#p' "$gomod"
    echo ")"
  } >"$src/go.mod"
  cat >"$src/tools.go" <<'GO'
//go:build tools

package tools

import (
	_ "k8s.io/kubernetes/cmd/kube-apiserver"
	_ "k8s.io/kubernetes/cmd/kubectl"
	_ "k8s.io/kubernetes/cmd/kube-controller-manager"
)
GO
  # Without these the binaries report v0.0.0-master and kubectl warns about version skew.
  local minor_num="${K8S_VERSION#v1.}"
  minor_num="${minor_num%%.*}"
  local ldflags="" pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$K8S_VERSION -X $pkg.gitMajor=1 -X $pkg.gitMinor=$minor_num"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=1970-01-01T00:00:00Z"
  done
  (cd "$src" && quiet "$src/build.log" go mod tidy
   local cmd
   for cmd in kube-apiserver kubectl kube-controller-manager; do
     quiet "$src/build.log" go build -trimpath -ldflags "$ldflags" -o "$out/$cmd.tmp" "k8s.io/kubernetes/cmd/$cmd"
     mv "$out/$cmd.tmp" "$out/$cmd"
   done)
}

build_etcd() {
  local out="$CACHE/etcd-$ETCD_VERSION/bin"
  if [[ -x "$out/etcd" ]]; then return 0; fi
  local src="$CACHE/etcd-$ETCD_VERSION/src"
  mkdir -p "$src" "$out"
  log "building etcd $ETCD_VERSION"
  cat >"$src/go.mod" <<GOMOD
module aigateway.local/testbed-etcd

go 1.23

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
GOMOD
  (cd "$src" && quiet "$src/build.log" go get "go.etcd.io/etcd/server/v3@$ETCD_VERSION" &&
    quiet "$src/build.log" go build -trimpath -o "$out/etcd.tmp" go.etcd.io/etcd/server/v3 &&
    mv "$out/etcd.tmp" "$out/etcd")
}

build_helm() {
  local out="$CACHE/helm-$HELM_VERSION/bin"
  if [[ -x "$out/helm" ]]; then return 0; fi
  local src="$CACHE/helm-$HELM_VERSION/src"
  mkdir -p "$src" "$out"
  log "building helm $HELM_VERSION"
  cat >"$src/go.mod" <<GOMOD
module aigateway.local/testbed-helm

go 1.24

require helm.sh/helm/v3 $HELM_VERSION
GOMOD
  (cd "$src" && quiet "$src/build.log" go get "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" &&
    quiet "$src/build.log" go build -trimpath -o "$out/helm.tmp" helm.sh/helm/v3/cmd/helm &&
    mv "$out/helm.tmp" "$out/helm")
}

# promtool (`promtool test rules` checks the chart's PrometheusRule), from the Prometheus module.
build_promtool() {
  local out="$CACHE/prometheus-$PROMETHEUS_VERSION/bin"
  if [[ -x "$out/promtool" ]]; then return 0; fi
  local src="$CACHE/prometheus-$PROMETHEUS_VERSION/src"
  mkdir -p "$src" "$out"
  log "building promtool $PROMETHEUS_VERSION (cold: a few minutes)"
  cat >"$src/go.mod" <<GOMOD
module aigateway.local/testbed-promtool

go 1.25

require github.com/prometheus/prometheus $PROMETHEUS_VERSION
GOMOD
  (cd "$src" && quiet "$src/build.log" go get "github.com/prometheus/prometheus/cmd/promtool@$PROMETHEUS_VERSION" &&
    quiet "$src/build.log" go build -trimpath -o "$out/promtool.tmp" github.com/prometheus/prometheus/cmd/promtool &&
    mv "$out/promtool.tmp" "$out/promtool")
}

# The CRDs of the projects our chart and examples write objects for (KEDA, the Prometheus
# Operator, Argo CD), copied out of their Go modules into one directory per version set.
fetch_third_party_crds() {
  local out="$CACHE/crds-keda-$KEDA_VERSION-promop-$PROMETHEUS_OPERATOR_VERSION-argocd-$ARGOCD_VERSION"
  if [[ -s "$out/done" ]]; then THIRD_PARTY_CRDS=$out; return 0; fi
  mkdir -p "$out"
  log "fetching the CRDs of KEDA $KEDA_VERSION, Prometheus Operator $PROMETHEUS_OPERATOR_VERSION, Argo CD $ARGOCD_VERSION"
  local mv dir
  for mv in "github.com/kedacore/keda/v2@$KEDA_VERSION:config/crd/bases" \
    "github.com/prometheus-operator/prometheus-operator@$PROMETHEUS_OPERATOR_VERSION:example/prometheus-operator-crd" \
    "github.com/argoproj/argo-cd/v3@$ARGOCD_VERSION:manifests/crds"; do
    dir=$(cd "$out" && go mod download -json "${mv%%:*}" | sed -n 's/.*"Dir": "\(.*\)",/\1/p')
    [[ -d "$dir/${mv#*:}" ]] || { log "could not download ${mv%%:*}"; return 1; }
    find "$dir/${mv#*:}" -maxdepth 1 -name '*.yaml' ! -name kustomization.yaml -exec cp {} "$out/" \;
  done
  chmod u+w "$out"/*.yaml
  echo ok >"$out/done"
  THIRD_PARTY_CRDS=$out
}

# The reader of our OCI image layouts (standin/oci-check, go-containerregistry), keyed by its sources.
build_oci_check() {
  local src
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/standin/oci-check"
  local key
  key=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-16)
  local out="$CACHE/oci-check-$key"
  if [[ ! -x "$out/oci-check" ]]; then
    mkdir -p "$out"
    log "building oci-check (go-containerregistry)"
    (cd "$src" && quiet "$out/build.log" go build -trimpath -o "$out/oci-check.tmp" . &&
      mv "$out/oci-check.tmp" "$out/oci-check")
  fi
  OCI_CHECK="$out/oci-check"
}

# The checker of the Envoy configs in our EnvoyFilters (standin/envoy-check), keyed by its sources.
build_envoy_check() {
  local src
  src="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/standin/envoy-check"
  local key
  key=$(cat "$src/go.mod" "$src/go.sum" "$src"/*.go | sha256sum | cut -c1-16)
  local out="$CACHE/envoy-check-$key"
  if [[ ! -x "$out/envoy-check" ]]; then
    mkdir -p "$out"
    log "building envoy-check (Envoy's protos from go-control-plane)"
    (cd "$src" && quiet "$out/build.log" go build -trimpath -o "$out/envoy-check.tmp" . &&
      mv "$out/envoy-check.tmp" "$out/envoy-check")
  fi
  ENVOY_CHECK="$out/envoy-check"
}

case "${1:-all}" in
  kube) build_kube ;;
  etcd) build_etcd ;;
  helm) build_helm ;;
  envoy-check) build_envoy_check; echo "$ENVOY_CHECK" ;;
  promtool) build_promtool ;;
  oci-check) build_oci_check; echo "$OCI_CHECK" ;;
  third-party-crds) fetch_third_party_crds; echo "$THIRD_PARTY_CRDS" ;;
  all) build_etcd; build_kube; build_helm; build_envoy_check; build_promtool; fetch_third_party_crds; build_oci_check ;;
  *) echo "usage: $0 [kube|etcd|helm|envoy-check|promtool|third-party-crds|oci-check|all]" >&2; exit 2 ;;
esac
