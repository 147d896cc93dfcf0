#!/usr/bin/env bash
# Prepare a Debian machine (root) for the container tests and image builds; safe to run again.
#   1. apt-get install docker.io debootstrap, when dockerd or debootstrap is missing;
#   2. start the private Docker daemon (containers/dockerd.sh) and print its `export DOCKER_HOST=...` line;
#   3. prune what earlier runs left in its data root (untagged images, build cache).
# Usage in CI:   eval "$(bash containers/ci-setup.sh)"; trap 'containers/dockerd.sh stop' EXIT
# Skip it all with INTERIORFUSION_NO_DOCKER=1 (the docker tests then skip with a reason).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ "${INTERIORFUSION_NO_DOCKER:-0}" == 1 ]]; then
    echo "ci-setup.sh: INTERIORFUSION_NO_DOCKER=1, not installing or starting Docker" >&2
    exit 0
fi
if [[ "$(id -u)" != 0 ]]; then
    echo "ci-setup.sh: not root, cannot install or start dockerd; the docker tests will skip" >&2
    exit 0
fi
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v debootstrap >/dev/null || need+=(debootstrap)
if ((${#need[@]})); then
    echo "ci-setup.sh: installing ${need[*]}" >&2
    apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" >&2
fi
"$here/dockerd.sh" start
# Images and build cache left by earlier runs on this machine: tagged images stay (the build skips them when
# their inputs match), the rest goes, so repeated runs do not fill the disk.
"$here/dockerd.sh" prune || true
