#!/usr/bin/env bash
# MLflow tracking server + registry for a team: Postgres backend, S3 (or MinIO) artifacts.
# Clients set MLFLOW_TRACKING_URI to this server and AWS_* for the artifact bucket; they write
# artifacts straight to the bucket (--no-serve-artifacts), as `tessera mlflow-server` does.
#
#   MLFLOW_BACKEND        postgresql+psycopg2://user:pass@host/mlflow (required)
#   MLFLOW_ARTIFACTS      s3://bucket/mlflow (required)
#   MLFLOW_ALLOWED_HOSTS  Host headers to accept, comma-separated (e.g. the compose service name
#                         "mlflow:*"); unset = MLflow's default: localhost and private addresses
#   MLFLOW_PORT (5000), MLFLOW_WORKERS (4)
set -euo pipefail
: "${MLFLOW_BACKEND:?set MLFLOW_BACKEND, e.g. postgresql+psycopg2://user:pass@host/mlflow}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://bucket/mlflow}"

# SQL stores need the installed MLflow's schema: creates the tables on an empty database,
# migrates an older one (idempotent). SQLite is migrated by the server itself.
if [[ "$MLFLOW_BACKEND" != sqlite:* ]]; then
  mlflow db upgrade "$MLFLOW_BACKEND"
fi

args=(
  --backend-store-uri "$MLFLOW_BACKEND"
  --default-artifact-root "$MLFLOW_ARTIFACTS"
  --no-serve-artifacts
  --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}"
)
if [[ -n "${MLFLOW_ALLOWED_HOSTS:-}" ]]; then
  args+=(--allowed-hosts "$MLFLOW_ALLOWED_HOSTS")
fi
exec mlflow server "${args[@]}"
