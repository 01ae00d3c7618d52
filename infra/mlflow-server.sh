#!/usr/bin/env bash
# MLflow tracking server + registry for a team: Postgres backend, S3 (or MinIO) artifacts.
# Clients set MLFLOW_TRACKING_URI to this server and AWS_* for the artifact bucket.
set -euo pipefail
: "${MLFLOW_BACKEND:?set MLFLOW_BACKEND, e.g. postgresql://user:pass@host/mlflow}"
: "${MLFLOW_ARTIFACTS:?set MLFLOW_ARTIFACTS, e.g. s3://bucket/mlflow}"
exec mlflow server \
  --backend-store-uri "$MLFLOW_BACKEND" \
  --default-artifact-root "$MLFLOW_ARTIFACTS" \
  --no-serve-artifacts \
  --host 0.0.0.0 --port "${MLFLOW_PORT:-5000}" --workers "${MLFLOW_WORKERS:-4}"
