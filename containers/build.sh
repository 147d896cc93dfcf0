#!/usr/bin/env bash
# Build the InteriorFusion images (Debian base, wheelhouse, base image, stage images); see containers/README.md.
#   containers/build.sh [--stages data,vae] [--tag TAG] [--online] [--base-image IMG] [--torch-spec SPEC] ...
# Uses DOCKER_HOST when set, else the private daemon of containers/dockerd.sh when it answers.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
if [[ -z "${DOCKER_HOST:-}" ]] && "$here/dockerd.sh" status; then
    eval "$("$here/dockerd.sh" env)"
    export DOCKER_HOST
fi
exec "${PYTHON:-python3}" "$here/build.py" "$@"
