"""The ``tessera`` command line: every pipeline step, the demo, servers and benchmarks.

Each step command runs the same function an Airflow task runs (``components.runner.run_step``),
under a fresh CLI run id unless ``--run-id`` names one to resume.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(
    help="Tessera: train, evaluate and ship Sora-style text-to-video models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
dataset_app = typer.Typer(
    help="Inspect and restore versioned datasets (DVC).", no_args_is_help=True
)
app.add_typer(dataset_app, name="dataset")

Profile = Annotated[
    str,
    typer.Option("--profile", "-p", help="Profile name (tiny, demo, small) or a YAML file path."),
]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a config key, e.g. --set ingest.workers=4 (repeatable)."),
]
RunId = Annotated[
    str | None,
    typer.Option("--run-id", help="Pipeline run id; reusing one resumes or no-ops finished steps."),
]
NoTrack = Annotated[bool, typer.Option("--no-track", help="Do not log to MLflow.")]


def _config(profile: str, overrides: list[str] | None):
    from components.config import load_config

    return load_config(profile, overrides or [])


def _context(run_id: str | None, no_track: bool):
    from components.runner import RunContext

    ctx = RunContext.new("cli", track=not no_track)
    return RunContext(run_id, "cli", None, not no_track) if run_id else ctx


def _emit(outputs: dict) -> None:
    typer.echo(json.dumps(outputs, indent=2, sort_keys=True, default=str))


# --------------------------------------------------------------------------- config


@app.command("config")
def config_show(profile: Profile = "demo", overrides: Overrides = None) -> None:
    """Print the fully resolved configuration (defaults < profile < --set)."""
    from components.config import to_yaml

    typer.echo(to_yaml(_config(profile, overrides)), nl=False)


# --------------------------------------------------------------------------- data intake


@app.command("demo-data")
def demo_data_cmd(
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Render the captioned demo corpus (real mp4/PNG/JPEG files) into the store."""
    from components import demo_data
    from components.runner import run_step

    cfg = _config(profile, overrides)
    _emit(run_step("demo_data", demo_data.generate, cfg, _context(run_id, no_track)))


@app.command("ingest")
def ingest_cmd(
    src: Annotated[
        str, typer.Argument(help="Dir, glob, s3://bucket/prefix, or a .txt list of URIs.")
    ],
    captions: Annotated[
        str | None,
        typer.Option(help="Parquet of captions (path, caption, short_caption, caption_source)."),
    ] = None,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Probe every file into manifest.parquet; everything else goes to quarantine.parquet."""
    from components import ingest
    from components.runner import run_step

    cfg = _config(profile, overrides)
    _emit(
        run_step("ingest", ingest.run, cfg, _context(run_id, no_track), src=src, captions=captions)
    )


@app.command("validate")
def validate_cmd(
    manifest: Annotated[
        str, typer.Argument(help="URI of manifest.parquet (from `tessera ingest`).")
    ],
    quarantine: Annotated[str | None, typer.Option(help="Quarantine table to extend.")] = None,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Validate a manifest with the Great Expectations suite; quarantine failing rows."""
    from components import validate
    from components.runner import run_step

    cfg = _config(profile, overrides)
    ctx = _context(run_id, no_track)
    _emit(run_step("validate", validate.run, cfg, ctx, manifest=manifest, quarantine=quarantine))


@app.command("version")
def version_cmd(
    manifest: Annotated[str, typer.Argument(help="URI of the validated manifest.parquet.")],
    captions: Annotated[
        str | None, typer.Option(help="captions.parquet to version alongside.")
    ] = None,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Version the validated dataset with DVC and push it to the remote."""
    from components import version
    from components.runner import run_step

    cfg = _config(profile, overrides)
    ctx = _context(run_id, no_track)
    _emit(run_step("version", version.run, cfg, ctx, manifest=manifest, captions=captions))


@dataset_app.command("checkout")
def dataset_checkout(
    rev: Annotated[str, typer.Argument(help="Dataset revision (git sha from `tessera version`).")],
    out: Annotated[Path, typer.Option(help="Directory to restore the dataset into.")] = Path(
        "dataset-checkout"
    ),
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Restore exactly the dataset of revision REV."""
    from components import version

    path = version.checkout(_config(profile, overrides), rev, out)
    typer.echo(f"dataset {rev} restored into {path}")


# --------------------------------------------------------------------------- training


@app.command("train-vae")
def train_vae_cmd(
    manifest: Annotated[str, typer.Argument(help="URI of the validated manifest.parquet.")],
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Train the causal video VAE with DeepSpeed (resumes from its checkpoints with --run-id)."""
    from components import runner, train_vae

    cfg, ctx = _config(profile, overrides), _context(run_id, no_track)
    _emit(
        runner.run_step(
            "train_vae",
            train_vae.run,
            cfg,
            ctx,
            manifest=manifest,
            checkpoint_dir=runner.checkpoint_dir(ctx, "train_vae"),
        )
    )


@app.command("encode")
def encode_cmd(
    manifest: Annotated[str, typer.Argument(help="URI of the validated manifest.parquet.")],
    vae: Annotated[str, typer.Option(help="VAE directory (the train-vae output's vae/).")],
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Encode every clip at native size into latent shards + index.parquet."""
    from components import encode, runner

    cfg, ctx = _config(profile, overrides), _context(run_id, no_track)
    _emit(runner.run_step("encode", encode.run, cfg, ctx, manifest=manifest, vae=vae))


@app.command("train-dit")
def train_dit_cmd(
    latents: Annotated[str, typer.Argument(help="The encode output's latents/ directory.")],
    vae: Annotated[
        str | None, typer.Option(help="VAE directory: enables sample videos and a complete model.")
    ] = None,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Train the diffusion transformer on packed spacetime patches with DeepSpeed."""
    from components import runner, train_dit

    cfg, ctx = _config(profile, overrides), _context(run_id, no_track)
    _emit(
        runner.run_step(
            "train_dit",
            train_dit.run,
            cfg,
            ctx,
            latents=latents,
            vae=vae,
            checkpoint_dir=runner.checkpoint_dir(ctx, "train_dit"),
        )
    )


# --------------------------------------------------------------------------- generation

ModelDir = Annotated[
    str, typer.Option("--model", help="Model directory (vae/ + dit/), e.g. the train_dit output.")
]


@app.command("generate")
def generate_cmd(
    model: ModelDir,
    prompt: Annotated[list[str], typer.Option("--prompt", help="Text prompt (repeatable).")],
    aspect: Annotated[
        list[str] | None,
        typer.Option(help="16:9, 9:16, 1:1, 21:9, 4:3, W:H, or image (one frame); repeatable."),
    ] = None,
    frames: Annotated[int, typer.Option(help="Frames per video (rounded up to 1 + 4k).")] = 17,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Text to video (or image): every prompt at every aspect ratio, written as mp4/png."""
    from components import generate
    from components.runner import run_step

    cfg = _config(profile, overrides)
    _emit(
        run_step(
            "generate",
            generate.generate,
            cfg,
            _context(run_id, no_track),
            model=model,
            prompts=list(prompt),
            aspects=list(aspect or ["16:9"]),
            frames=frames,
        )
    )


@app.command("edit")
def edit_cmd(
    model: ModelDir,
    input: Annotated[str, typer.Option("--input", help="Video or image to edit (path or URI).")],
    prompt: Annotated[str, typer.Option(help="What the result should show.")],
    strength: Annotated[
        float, typer.Option(help="0 keeps the input, 1 ignores it (SDEdit noise level).")
    ] = 0.6,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Text-guided editing of an image or video (SDEdit)."""
    from components import generate
    from components.runner import run_step

    cfg = _config(profile, overrides)
    _emit(
        run_step(
            "edit",
            generate.edit,
            cfg,
            _context(run_id, no_track),
            model=model,
            input=input,
            prompt=prompt,
            strength=strength,
        )
    )


@app.command("eval-prompts")
def eval_prompts_cmd(
    model: ModelDir,
    corpus: Annotated[
        str,
        typer.Option(
            help="A demo-data output directory (clips/, captions.parquet, factors.parquet)."
        ),
    ],
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Colour-following check: recoloured corpus captions, same seed, colour read back."""
    from components import demo_data, prompt_eval, storage
    from components.runner import run_step

    cfg = _config(profile, overrides)
    _emit(
        run_step(
            "prompt_eval",
            prompt_eval.run,
            cfg,
            _context(run_id, no_track),
            model=model,
            clips=storage.join(corpus, demo_data.CLIPS_DIR),
            captions=storage.join(corpus, demo_data.CAPTIONS_FILE),
            factors=storage.join(corpus, demo_data.FACTORS_FILE),
        )
    )


# --------------------------------------------------------------------------- pipeline


@app.command("run")
def run_pipeline(
    profile: Profile = "demo",
    overrides: Overrides = None,
    source: Annotated[
        str, typer.Option(help="Raw videos to ingest; empty renders the demo corpus.")
    ] = "",
) -> None:
    """Run the whole pipeline DAG once through Airflow (`airflow dags test`)."""
    from components import airflow_local

    airflow_local.dags_test(profile, overrides or [], source)


@app.command("demo")
def demo(profile: Profile = "demo", port: int = 5000) -> None:
    """Start MLflow on loopback and run the pipeline DAG on the demo corpus; print where to look."""
    from components import airflow_local
    from components.config import Environment
    from components.tracking import MlflowServer

    env = Environment.read()
    server = MlflowServer(env.home, port=port).start()
    os.environ["MLFLOW_TRACKING_URI"] = server.url  # the DAG run's tasks inherit it
    summary = airflow_local.dags_test(profile, [], "")
    typer.echo("")
    typer.secho("Tessera demo finished.", bold=True)
    typer.echo(f"  MLflow UI     {server.url}  (experiment tessera/tessera_pipeline; left running)")
    typer.echo(f"  Airflow UI    make airflow-ui  (AIRFLOW_HOME={airflow_local.airflow_home()})")
    typer.echo(f"  store         {env.home / 'store'}")
    for key, value in summary.items():
        typer.echo(f"  {key:<13} {value}")


# --------------------------------------------------------------------------- servers, bench


@app.command("mlflow-server")
def mlflow_server(
    port: int = 5000,
    host: Annotated[str, typer.Option(help="Bind address; loopback by default.")] = "127.0.0.1",
    foreground: Annotated[bool, typer.Option(help="Run in the foreground until Ctrl-C.")] = False,
    stop: Annotated[bool, typer.Option(help="Stop a background server on this port.")] = False,
) -> None:
    """Run a real MLflow tracking server + registry (SQLite under TESSERA_HOME)."""
    from components.config import Environment
    from components.tracking import MlflowServer

    server = MlflowServer(Environment.read().home, host=host, port=port)
    if stop:
        server.stop()
        typer.echo(f"stopped mlflow server on port {port}")
        return
    if foreground:
        os.execv(sys.executable, server.command())
    server.start()
    typer.echo(f"MLflow at {server.url} (log {server.log_path})")
    typer.echo(f"export MLFLOW_TRACKING_URI={server.url}")


@app.command("bench")
def bench(
    only: Annotated[
        list[str] | None, typer.Option(help="Run only cases whose name starts with this.")
    ] = None,
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Run the benchmarks (ours vs a named peer, same run) into TESSERA_HOME/bench/results.json."""
    from components.bench import print_table, run_benchmarks
    from components.config import Environment

    out = Environment.read().home / "bench" / "results.json"
    records = run_benchmarks(_config(profile, overrides), only, out)
    print_table(records, out)


def main() -> None:
    """Console entry point: known errors become one clear line and exit code 2."""
    from components.config import ConfigError
    from components.storage import StorageError
    from components.tracking import TrackingError

    try:
        app()
    except (ConfigError, StorageError, TrackingError, FileNotFoundError) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(2) from None
