"""Tessera's main pipeline as an Airflow DAG: raw videos → manifest → validated → versioned.

Orchestration only: every task calls one function of ``components.pipeline`` (imported inside
the task body, so parsing this file stays cheap), and only URIs and small dicts travel in XCom.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import Param, dag, task

DOC = """
### Tessera pipeline
Raw videos (a directory, glob or `s3://` prefix in **source**; empty renders the demo corpus)
are probed into a manifest (`ingest`, corrupt files quarantined with a reason), checked by the
Great Expectations suite (`validate`, Data Docs logged to MLflow) and versioned with DVC
(`version`). The video VAE is trained (`train_vae`, DeepSpeed), every clip is encoded at native
size into latent shards (`encode_shard`, mapped over shards, then `merge_latents`), the diffusion
transformer is trained on packed spacetime patches (`train_dit`, DeepSpeed, resumes from its
checkpoints on retry), `samples` renders videos at 16:9, 9:16, 1:1 and a still image, and
`prompt_eval` scores how well generated clips follow the colour named in recoloured corpus
captions (demo corpus only). Each step writes to `{store}/runs/{run_id}/{step}/` atomically, so
a retry of a finished step is a no-op and a retry of a crashed one starts that step again cleanly.
MLflow: experiment `tessera/tessera_pipeline`, one parent run per DAG run, one nested run per step.
"""

PARAMS = {
    "profile": Param("demo", type="string", description="tiny | demo | small, or a YAML path"),
    "overrides": Param([], type="array", description="config overrides, e.g. ingest.workers=4"),
    "source": Param("", type="string", description="raw videos; empty = render the demo corpus"),
    "captions": Param("", type="string", description="captions.parquet for `source` (optional)"),
    "track": Param(True, type="boolean", description="log to MLflow"),
}


@dag(
    dag_id="tessera_pipeline",
    schedule=None,
    catchup=False,
    max_active_runs=1,  # DVC cannot run concurrently in one workspace
    params=PARAMS,
    doc_md=DOC,
    tags=["tessera"],
    default_args={"retries": 2, "retry_delay": timedelta(seconds=30)},
)
def tessera_pipeline():
    @task
    def start(params=None, run_id=None) -> dict:
        from components import pipeline

        return pipeline.start(dict(params), run_id)

    @task
    def corpus(run: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.corpus(dict(params), run)

    @task
    def ingest(run: dict, raw: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.ingest(dict(params), run, raw)

    @task
    def validate(run: dict, ingested: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.validate(dict(params), run, ingested)

    @task
    def version(run: dict, validated: dict, raw: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.version(dict(params), run, validated, raw)

    @task
    def train_vae(run: dict, validated: dict, versioned: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.train_vae(dict(params), run, validated)

    @task
    def plan_encode(run: dict, validated: dict, params=None) -> list:
        from components import pipeline

        return pipeline.plan_encode(dict(params), run, validated)

    @task(max_active_tis_per_dagrun=2)
    def encode_shard(run: dict, validated: dict, vae: dict, shard: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.encode_shard(dict(params), run, validated, vae, shard)

    @task
    def merge_latents(run: dict, shards: list, params=None) -> dict:
        from components import pipeline

        return pipeline.merge_latents(dict(params), run, list(shards))

    @task
    def train_dit(run: dict, latents: dict, vae: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.train_dit(dict(params), run, latents, vae)

    @task
    def samples(run: dict, dit: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.samples(dict(params), run, dit)

    @task
    def prompt_eval(run: dict, raw: dict, dit: dict, params=None) -> dict:
        from components import pipeline

        return pipeline.prompt_eval(dict(params), run, raw, dit)

    @task(retries=0)
    def finish(
        run: dict,
        ingested: dict,
        validated: dict,
        versioned: dict,
        vae: dict,
        latents: dict,
        dit: dict,
        sampled: dict,
        evaluated: dict,
        params=None,
    ) -> dict:
        from components import pipeline

        return pipeline.finish(
            dict(params),
            run,
            ingest=ingested,
            validate=validated,
            version=versioned,
            train_vae=vae,
            encode=latents,
            train_dit=dit,
            samples=sampled,
            prompt_eval=evaluated,
        )

    run = start()
    raw = corpus(run)
    ingested = ingest(run, raw)
    validated = validate(run, ingested)
    versioned = version(run, validated, raw)
    vae = train_vae(run, validated, versioned)
    shards = encode_shard.partial(run=run, validated=validated, vae=vae).expand(
        shard=plan_encode(run, validated)
    )
    latents = merge_latents(run, shards)
    dit = train_dit(run, latents, vae)
    sampled = samples(run, dit)
    evaluated = prompt_eval(run, raw, dit)
    finish(run, ingested, validated, versioned, vae, latents, dit, sampled, evaluated)


pipeline_dag = tessera_pipeline()
