#!/usr/bin/env bash
# One-shot Airflow setup, idempotent: migrate the metadata DB, create the pools Tessera's DAGs
# use (components/orchestration/airflow_local.py: POOLS) and, for the simple auth manager,
# write the admin login from the environment. Run by the compose service `airflow-init` and by
# the Helm chart's migrate-database job (infra/kubernetes/values-airflow.yaml).
#
#   TESSERA_ACCELERATOR_SLOTS  slots of the pool `accelerator`: training jobs (sweep points) the
#                              accelerators hold at once (default 1)
#   AIRFLOW_ADMIN_PASSWORD     with AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE: the
#                              password of the simple auth manager's user `admin`
set -euo pipefail

airflow db migrate
airflow pools set tessera_dvc 1 "DVC and git: one version task at a time per workspace"
airflow pools set accelerator "${TESSERA_ACCELERATOR_SLOTS:-1}" \
  "training runs (sweep points): one per free accelerator"
airflow pools set tessera_registry 1 \
  "MLflow registrations and promotions: one at a time per registry"

passwords="${AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE:-}"
if [[ -n "$passwords" && -n "${AIRFLOW_ADMIN_PASSWORD:-}" ]]; then
  # the api-server reads it and generates no password for `admin` (it would print one to its log)
  mkdir -p "$(dirname "$passwords")"
  umask 077
  python -c 'import json, os, sys
json.dump({"admin": os.environ["AIRFLOW_ADMIN_PASSWORD"]}, open(sys.argv[1], "w"))' "$passwords"
fi
