"""Running the steps as a pipeline: the DAG's task bodies and the local Airflow runner."""
