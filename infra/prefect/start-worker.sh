#!/bin/sh
# Create (or update) the Docker work pool from docker-work-pool.json, with ${VAR}s filled from this
# container's environment (S3 endpoint and keys, artifact root), then run the worker with a health endpoint.
set -eu
pool="${WORK_POOL:-interiorfusion-docker}"
python -c 'import os, sys; sys.stdout.write(os.path.expandvars(open(sys.argv[1]).read()))' \
    /opt/interiorfusion/docker-work-pool.json >/tmp/docker-work-pool.json
prefect work-pool create "$pool" --type docker --base-job-template /tmp/docker-work-pool.json --overwrite
exec prefect worker start --pool "$pool" --type docker --with-healthcheck
