#!/usr/bin/env bash
# Renders the example overlays with kustomize (`kubectl kustomize`), using
# stand-in files for the Secrets and trust lists an operator supplies (never
# committed), and validates what would actually be applied with validate.py:
# the Kubernetes schemas, and the deployment rules (non-root, read-only root
# filesystem, probes, gate replicas / HPA / PDB, facematch denied all egress)
# after every patch and namespace is applied.
#
#   tools/k8s/build.sh [PYTHON] [KUBERNETES_VERSION]
#
# Needs kubectl with its built-in kustomize (v5); without it, prints why and
# exits 0 (the per-file validation of validate.py still runs in CI).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${1:-python3}"
VERSION="${2:-1.31.0}"
if ! kubectl kustomize --help >/dev/null 2>&1; then
  echo "kubectl (with kustomize) is not installed: overlays not rendered; per-file validation still applies"
  exit 0
fi
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
cp -r k8s "$tmp/k8s"
o="$tmp/k8s/overlays/haihe-property"
mkdir -p "$o/keys" "$o/facematch-tokens" "$tmp/rendered"
for f in token-signing.ed25519 keyed-hash.secret consent-attestation.ed25519 credential-secrets.key \
  audit-checkpoint.ed25519 gate-bundle.ed25519; do
  head -c 32 /dev/urandom >"$o/keys/$f"
done
echo "postgres://estate:stand-in@haihe-pg-rw.databases:5432/estate" >"$o/database.url"
echo "redis://:stand-in@haihe-redis.databases:6379" >"$o/redis.url"
echo "stand-in-token" >"$o/facematch-tokens/gate"
echo "stand-in-token" >"$o/facematch-tokens/consent"
head -c 32 /dev/urandom >"$o/facematch/tenant.key"
echo "k1 $(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$o/facematch/consent.keys"
cp "$o/facematch/consent.keys" "$o/facematch/token.keys"
echo "0190c0de-0000-7000-8000-000000000001" >"$o/facematch/tenant_id"
kubectl kustomize "$o" >"$tmp/rendered/haihe-property.yaml"
kubectl kustomize "$o/facematch" >"$tmp/rendered/haihe-property-facematch.yaml"
echo "rendered: $(grep -c '^kind:' "$tmp/rendered/haihe-property.yaml") resources for the mesh," \
  "$(grep -c '^kind:' "$tmp/rendered/haihe-property-facematch.yaml") for facematch"
"$PY" tools/k8s/validate.py "$tmp/rendered" "$VERSION"
