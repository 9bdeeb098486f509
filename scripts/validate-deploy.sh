#!/usr/bin/env bash
# Validates everything under deploy/ offline, against published schemas from the package
# registries (no cluster, no Docker engine needed):
#   - deploy/compose/compose.yaml against the Compose Specification's JSON schema, the copy
#     check-jsonschema (PyPI) ships as `vendor.compose-spec`;
#   - deploy/k8s/*.yaml (every manifest but the kustomization) against Kubernetes' own OpenAPI
#     schemas, strictly (unknown fields refused), with kubernetes-validate (PyPI);
#   - deploy/compose/prometheus.yml with promtool when Prometheus is installed
#     (scripts/check-prometheus.sh installs it).
# The tools live in a venv (ITAMAE_DEPLOY_VENV, default ~/.cache/itamae/deployvenv).
set -euo pipefail
cd "$(dirname "$0")/.."
cache="${ITAMAE_CACHE:-$HOME/.cache/itamae}"
venv="${ITAMAE_DEPLOY_VENV:-$cache/deployvenv}"
k8s_version=1.33.0

if ! "$venv/bin/python" -c 'import kubernetes_validate, check_jsonschema' 2>/dev/null; then
  echo "setting up $venv (check-jsonschema, kubernetes-validate from PyPI) ..."
  mkdir -p "$(dirname "$venv")"
  python3 -m venv "$venv"
  "$venv/bin/pip" install -q check-jsonschema==0.39.0 kubernetes-validate==1.37.0
fi

echo "compose: deploy/compose/compose.yaml"
"$venv/bin/check-jsonschema" --builtin-schema vendor.compose-spec deploy/compose/compose.yaml

manifests=()
for f in deploy/k8s/*.yaml; do
  [ "$(basename "$f")" = kustomization.yaml ] || manifests+=("$f")
done
echo "kubernetes $k8s_version (strict): ${manifests[*]}"
"$venv/bin/kubernetes-validate" --strict --quiet -k "$k8s_version" "${manifests[@]}"

if command -v promtool >/dev/null; then
  tmp="$(mktemp -d)"; trap 'rm -rf "$tmp"' EXIT
  # The key file is a Compose secret at run time; promtool wants it to exist.
  sed "s#/etc/prometheus/itamae-admin.key#$tmp/key#" deploy/compose/prometheus.yml >"$tmp/p.yml"
  echo x >"$tmp/key"
  promtool check config "$tmp/p.yml" >/dev/null
  echo "prometheus: deploy/compose/prometheus.yml OK"
fi
echo "deploy/ is valid"
