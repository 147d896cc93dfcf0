#!/bin/sh
# Runs once, on the first start of an empty data volume (docker-entrypoint-initdb.d): creates the databases
# named in INTERIORFUSION_EXTRA_DATABASES (comma-separated) besides POSTGRES_DB, owned by POSTGRES_USER.
set -eu
for db in $(echo "${INTERIORFUSION_EXTRA_DATABASES:-}" | tr ',' ' '); do
    echo "creating database $db"
    psql -v ON_ERROR_STOP=1 --username "$POSTGRES_USER" --dbname postgres \
        -c "CREATE DATABASE \"$db\" OWNER \"$POSTGRES_USER\""
done
