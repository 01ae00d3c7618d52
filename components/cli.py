"""The ``tessera`` command line: one command per pipeline step, plus the demo, servers, bench.

A step command is declared once with :func:`step_command`: its function takes the step's own
arguments and returns the step's inputs; the decorator adds ``--profile/-p``, ``--set``,
``--run-id`` and ``--no-track`` and runs the step exactly as an Airflow task does
(``components.core.runner``), under a fresh CLI run id unless ``--run-id`` names one to resume.
"""

from __future__ import annotations

import functools
import inspect
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

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
checkpoint_app = typer.Typer(help="Training checkpoints (DeepSpeed).", no_args_is_help=True)
app.add_typer(checkpoint_app, name="checkpoint")

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
ModelDir = Annotated[
    str,
    typer.Option(
        "--model", help="Model directory (vae/ + dit/): the sweep's or train_dit's output."
    ),
]
GeneratorModel = Annotated[
    str,
    typer.Option(
        "--model",
        help="Model directory (vae/ + dit/: the sweep's or train_dit's output), or a registered "
        "model: models:/tessera-t2v@champion, models:/tessera-t2v/3.",
    ),
]
_RUN_OPTIONS = [
    inspect.Parameter(
        "profile", inspect.Parameter.KEYWORD_ONLY, default="demo", annotation=Profile
    ),
    inspect.Parameter(
        "overrides", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Overrides
    ),
    inspect.Parameter("run_id", inspect.Parameter.KEYWORD_ONLY, default=None, annotation=RunId),
    inspect.Parameter(
        "no_track", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=NoTrack
    ),
]


def _config(profile: str, overrides: list[str] | None):
    from components.core.config import load_config

    return load_config(profile, overrides or [])


def step_command(name: str) -> Callable[[Callable[..., dict[str, Any]]], Callable[..., None]]:
    """Register ``tessera <name with dashes>`` for step ``name``; the function's docstring is
    the help, its parameters the step's own arguments, its result the step's inputs."""

    def register(fn: Callable[..., dict[str, Any]]) -> Callable[..., None]:
        signature = inspect.signature(fn, eval_str=True)

        @functools.wraps(fn)
        def command(**kwargs: Any) -> None:
            from components.core import runner
            from components.orchestration.tasks import spec

            profile, overrides = kwargs.pop("profile"), kwargs.pop("overrides")
            run_id, no_track = kwargs.pop("run_id"), kwargs.pop("no_track")
            cfg = _config(profile, overrides)
            track = not no_track
            if run_id:
                ctx = runner.RunContext(run_id, "cli", None, track)
            else:
                ctx = runner.RunContext.new("cli", track=track)
            outputs = runner.run_in_process(spec(name), cfg, ctx, **fn(**kwargs))
            typer.echo(json.dumps(outputs, indent=2, sort_keys=True, default=str))

        params = [*signature.parameters.values(), *_RUN_OPTIONS]
        command.__signature__ = signature.replace(parameters=params, return_annotation=None)
        return app.command(name.replace("_", "-"))(command)

    return register


# --------------------------------------------------------------------------- data intake


@step_command("demo_data")
def demo_data() -> dict:
    """Render the captioned demo corpus (real mp4/PNG/JPEG files) into the store."""
    return {}


@step_command("ingest")
def ingest(
    src: Annotated[
        str, typer.Argument(help="Dir, glob, s3://bucket/prefix, or a .txt list of URIs.")
    ],
    captions: Annotated[
        str | None,
        typer.Option(help="Parquet of captions (path, caption, short_caption, caption_source)."),
    ] = None,
) -> dict:
    """Probe every file into manifest.parquet; everything else goes to quarantine.parquet."""
    return {"src": src, "captions": captions}


@step_command("validate")
def validate(
    manifest: Annotated[
        str, typer.Argument(help="URI of manifest.parquet (from `tessera ingest`).")
    ],
    quarantine: Annotated[str | None, typer.Option(help="Quarantine table to extend.")] = None,
) -> dict:
    """Validate a manifest with the Great Expectations suite; quarantine failing rows."""
    return {"manifest": manifest, "quarantine": quarantine}


@step_command("version")
def version(
    manifest: Annotated[str, typer.Argument(help="URI of the validated manifest.parquet.")],
    captions: Annotated[
        str | None, typer.Option(help="captions.parquet to version alongside.")
    ] = None,
) -> dict:
    """Version the validated dataset with DVC, push it, and write the manifest training reads."""
    return {"manifest": manifest, "captions": captions}


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
    from components.steps import version as step

    path = step.checkout(_config(profile, overrides), rev, out)
    typer.echo(f"dataset {rev} restored into {path}")


# --------------------------------------------------------------------------- training


@step_command("train_captioner")
def train_captioner(
    manifest: Annotated[str, typer.Argument(help="URI of the versioned manifest.parquet.")],
    factors: Annotated[
        str, typer.Option(help="The demo corpus's factors.parquet: held-out attribute accuracy.")
    ] = "",
) -> dict:
    """Train the video captioner (short + descriptive styles, and prompt expansion) on the
    captioned clips; report held-out BLEU-4, ROUGE-L and attribute accuracy."""
    return {"manifest": manifest, "factors": factors}


@app.command("caption")
def caption(
    manifest: Annotated[str, typer.Argument(help="URI of the versioned manifest.parquet.")],
    captioner: Annotated[
        str,
        typer.Option(
            help="A trained captioner (train-captioner's captioner/); default: train one."
        ),
    ] = "",
    factors: Annotated[
        str, typer.Option(help="With no --captioner: the factors.parquet for its report.")
    ] = "",
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Re-caption every clip (both styles, in shards) into captions.parquet; without
    --captioner, train-captioner runs first in the same run."""
    from components.core import runner
    from components.orchestration.tasks import spec

    cfg = _config(profile, overrides)
    track = not no_track
    ctx = (
        runner.RunContext(run_id, "cli", None, track)
        if run_id
        else runner.RunContext.new("cli", track=track)
    )
    if not captioner:
        trained = runner.run_in_process(
            spec("train_captioner"), cfg, ctx, manifest=manifest, factors=factors
        )
        captioner = trained["captioner"]
    outputs = runner.run_in_process(
        spec("caption"), cfg, ctx, manifest=manifest, captioner=captioner
    )
    typer.echo(json.dumps(outputs, indent=2, sort_keys=True, default=str))


@step_command("train_vae")
def train_vae(
    manifest: Annotated[str, typer.Argument(help="URI of the versioned manifest.parquet.")],
) -> dict:
    """Train the causal video VAE with DeepSpeed (resumes from its checkpoints with --run-id)."""
    return {"manifest": manifest}


@step_command("encode")
def encode(
    manifest: Annotated[str, typer.Argument(help="URI of the versioned manifest.parquet.")],
    vae: Annotated[str, typer.Option(help="VAE directory (the train-vae output's vae/).")],
    captions: Annotated[
        str | None,
        typer.Option(help="The caption step's captions.parquet: train on re-captioned captions."),
    ] = None,
) -> dict:
    """Encode every clip at native size into latent shards + index.parquet."""
    return {"manifest": manifest, "vae": vae, "captions": captions}


@step_command("train_dit")
def train_dit(
    latents: Annotated[str, typer.Argument(help="The encode output's latents/ directory.")],
    vae: Annotated[
        str | None, typer.Option(help="VAE directory: enables sample videos and a complete model.")
    ] = None,
) -> dict:
    """Train the diffusion transformer on packed spacetime patches with DeepSpeed."""
    return {"latents": latents, "vae": vae}


@app.command("sweep")
def sweep(
    latents: Annotated[str, typer.Argument(help="The encode output's latents/ directory.")],
    vae: Annotated[
        str | None, typer.Option(help="VAE directory: samples per point and a complete model.")
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option("--dry-run", help="Print the plan (runs, steps, FLOPs, time); train nothing."),
    ] = False,
    profile: Profile = "demo",
    overrides: Overrides = None,
    run_id: RunId = None,
    no_track: NoTrack = False,
) -> None:
    """Train one DiT per compute budget (x size x variant) with DeepSpeed, fit the scaling law
    L(C) = a*C^-b + L_inf, and select the best run (set sweep.budgets, in training FLOPs)."""
    from components.core import runner
    from components.steps import sweep as step
    from components.steps.sweep.plan import table

    cfg = _config(profile, overrides)
    if dry_run:
        typer.echo(table(step.plan_rows(cfg, latents)))
        return
    track = not no_track
    ctx = (
        runner.RunContext(run_id, "cli", None, track)
        if run_id
        else runner.RunContext.new("cli", track=track)
    )
    outputs = runner.run_in_process(step.STEP, cfg, ctx, latents=latents, vae=vae)
    typer.echo(json.dumps(outputs, indent=2, sort_keys=True, default=str))


@step_command("train_evaluator")
def train_evaluator(
    manifest: Annotated[str, typer.Argument(help="URI of the versioned manifest.parquet.")],
) -> dict:
    """Train the in-domain video-text evaluator (fvd_domain, clip_score_domain) and check it on
    held-out clips: retrieval vs chance, FVD under corruption, CLIP score vs shuffled captions."""
    return {"manifest": manifest}


# --------------------------------------------------------------------------- generation


@step_command("generate")
def generate(
    model: GeneratorModel,
    prompt: Annotated[list[str], typer.Option("--prompt", help="Text prompt (repeatable).")],
    aspect: Annotated[
        list[str] | None,
        typer.Option(help="16:9, 9:16, 1:1, 21:9, 4:3, W:H, or image (one frame); repeatable."),
    ] = None,
    frames: Annotated[
        int | None,
        typer.Option(
            help="Frames per video, rounded up to 1 + 4k (default generate.sample_frames)."
        ),
    ] = None,
    expand: Annotated[
        bool | None,
        typer.Option(
            "--expand/--no-expand",
            help="Expand prompts into descriptive captions first (default generate.expand).",
        ),
    ] = None,
) -> dict:
    """Text to video (or image): every prompt at every aspect ratio, written as mp4/png."""
    return {
        "model": model,
        "prompts": list(prompt),
        "aspects": aspect or ["16:9"],
        "frames": frames,
        "expand": expand,
    }


@app.command("expand")
def expand(
    prompt: Annotated[str, typer.Argument(help="A short prompt, e.g. 'red ball bouncing'.")],
    seed: Annotated[int, typer.Option(help="Same prompt + seed = same expansion.")] = 0,
    model: Annotated[
        str,
        typer.Option(
            help="builtin: a captioner directory (default: the latest trained one in the "
            "store); hf: a causal LM directory. Sets expand.model."
        ),
    ] = "",
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the text and its metadata.")
    ] = False,
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Expand a short prompt into a long descriptive caption in the style of the training
    captions (backend: expand.backend = builtin | chat | hf)."""
    from components.core import expansion

    cfg = _config(profile, [*(overrides or []), *([f"expand.model={model}"] if model else [])])
    result = expansion.expand_with_config(prompt, cfg, seed=seed)
    if as_json:
        typer.echo(json.dumps({"text": result.text, **result.metadata}, indent=2, default=str))
    else:
        typer.echo(result.text)


@step_command("edit")
def edit(
    model: ModelDir,
    input: Annotated[str, typer.Option("--input", help="Video or image to edit (path or URI).")],
    prompt: Annotated[str, typer.Option(help="What the result should show.")],
    strength: Annotated[
        float, typer.Option(help="0 keeps the input, 1 ignores it (SDEdit noise level).")
    ] = 0.6,
) -> dict:
    """Text-guided editing of an image or video (SDEdit)."""
    return {"model": model, "input": input, "prompt": prompt, "strength": strength}


@step_command("evaluate")
def evaluate(
    manifest: Annotated[
        str, typer.Option(help="Versioned manifest (the version step's); its val split is real.")
    ],
    model: Annotated[
        str, typer.Option(help="Model directory with vae/ and dit/ (train_dit's output).")
    ] = "",
    videos: Annotated[
        str,
        typer.Option(help="Instead of a model: a folder of generated videos (+ prompts.jsonl)."),
    ] = "",
    evaluator: Annotated[
        str, typer.Option(help="train_evaluator's output: fvd_domain and clip_score_domain.")
    ] = "",
    corpus: Annotated[
        str,
        typer.Option(
            help="A demo-data output directory: domain prompts, colour following and framing."
        ),
    ] = "",
    scaling: Annotated[str, typer.Option(help="A scaling-law plot (PNG) for the report.")] = "",
) -> dict:
    """FVD, CLIP score, reconstruction, colour following and framing; writes report.html."""
    from components.core import demo_corpus, storage

    inputs = {"manifest": manifest, "model": model, "videos": videos, "evaluator": evaluator}
    if corpus:
        inputs |= {
            "clips": storage.join(corpus, demo_corpus.CLIPS_DIR),
            "captions": storage.join(corpus, demo_corpus.CAPTIONS_FILE),
            "factors": storage.join(corpus, demo_corpus.FACTORS_FILE),
        }
    return inputs | ({"scaling": scaling} if scaling else {})


# --------------------------------------------------------------------------- pipeline


@app.command("run")
def run_pipeline(
    profile: Profile = "demo",
    overrides: Overrides = None,
    source: Annotated[
        str, typer.Option(help="Raw videos to ingest; empty renders the demo corpus.")
    ] = "",
    captions: Annotated[str, typer.Option(help="captions.parquet for --source.")] = "",
    run_name: Annotated[
        str,
        typer.Option(
            help="The run's id in the store and MLflow; a finished run's id reuses its steps."
        ),
    ] = "",
) -> None:
    """Run the whole pipeline DAG once through Airflow (`airflow dags test`)."""
    from components.orchestration import airflow_local

    params = {"run_name": run_name} if run_name else None
    summary = airflow_local.dags_test(profile, overrides or [], source, captions, params=params)
    _print_summary(summary)


@app.command("recaption-ablation")
def recaption_ablation(
    source_run: Annotated[
        str, typer.Option(help="A finished pipeline run id (its latents, VAE, evaluator, corpus).")
    ] = "",
    budget: Annotated[float, typer.Option(help="Training FLOPs of each of the two DiTs.")] = 4e13,
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Run the recaption_ablation DAG: two DiTs at equal compute (short vs recaptioned
    captions), each prompted with short prompts typed and expanded; the 2x2 table."""
    from components.orchestration import airflow_local

    summary = airflow_local.dags_test(
        profile,
        overrides or [],
        dag_id="recaption_ablation",
        params={"source_run": source_run, "budget": budget},
    )
    typer.echo(f"  table            {summary['recaption_ablation']['table']}")


def _json_option(name: str, text: str, kind: type) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise typer.BadParameter(f"{name} is not JSON: {exc}") from None
    if not isinstance(value, kind):
        raise typer.BadParameter(f"{name} must be a JSON {kind.__name__}, got {text[:200]}")
    return value


@app.command("task")
def task(
    step: Annotated[
        str, typer.Argument(help="Step name (train_vae, sweep, ...), or start / finish.")
    ],
    plan: Annotated[bool, typer.Option("--plan", help="Plan the step's parts.")] = False,
    part: Annotated[
        str | None, typer.Option("--part", help="Run one planned part (its JSON).")
    ] = None,
    params: Annotated[str, typer.Option(help="The DAG run's params (JSON object).")] = "{}",
    run: Annotated[
        str,
        typer.Option(help="The run handle of `task start` (JSON); for start: {run_id, pipeline}."),
    ] = "{}",
    inputs: Annotated[
        str,
        typer.Option(help="The step's inputs (JSON object); for finish: {states} or {status}."),
    ] = "{}",
    upstream: Annotated[
        str | None,
        typer.Option(
            help="STEP is a DAG task id and this its upstream tasks' outputs by the task's "
            "argument names (JSON object; a Kubeflow component)."
        ),
    ] = None,
    output: Annotated[
        Path, typer.Option(help="Where the JSON result goes (KubernetesPodOperator's XCom).")
    ] = Path("/airflow/xcom/return.json"),
) -> None:
    """Run one DAG task's body, as an orchestrator's container does (Kubernetes pods in
    [tessera] task_mode = kubernetes, Kubeflow components): the same code and arguments as the
    Airflow task, the JSON result written to OUTPUT."""
    from components.orchestration import tasks

    result = tasks.command(
        step,
        _json_option("--params", params, dict),
        _json_option("--run", run, dict),
        _json_option("--inputs", inputs, dict),
        plan=plan,
        part=None if part is None else _json_option("--part", part, dict),
        upstream=None if upstream is None else _json_option("--upstream", upstream, dict),
    )
    text = json.dumps(result, sort_keys=True, default=str)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp")
    tmp.write_text(text)
    tmp.replace(output)  # the sidecar never reads half a file
    typer.echo(text)


@app.command("demo")
def demo(profile: Profile = "demo", port: int = 5000) -> None:
    """Start MLflow on loopback and run the pipeline DAG on the demo corpus; print where to look."""
    from components.core import tracking
    from components.core.config import Environment
    from components.orchestration import airflow_local
    from components.orchestration.tasks import PIPELINE

    env = Environment.read()
    server = tracking.MlflowServer(env.home, port=port).start()
    os.environ["MLFLOW_TRACKING_URI"] = server.url  # the DAG run's tasks inherit it
    # one run per profile and config: running the demo again reuses the steps it committed
    run_name = f"demo-{Path(profile).stem}-{_config_digest(_config(profile, []))}"
    typer.echo(f"run {run_name} (steps it committed before are reused; `make clean` starts over)")
    summary = airflow_local.dags_test(profile, [], "", params={"run_name": run_name})
    tracking.setup()
    experiment = tracking.ensure_experiment(
        tracking.experiment_name(PIPELINE, _config(profile, []))
    )
    typer.echo("")
    typer.secho("Tessera demo finished.", bold=True)
    typer.echo(f"  MLflow UI     {tracking.experiment_url(server.url, experiment)}  (left running)")
    typer.echo(f"  Airflow UI    make airflow-ui  (AIRFLOW_HOME={airflow_local.airflow_home()})")
    typer.echo(f"  store         {env.home / 'store'}")
    _print_summary(summary)


def _config_digest(cfg) -> str:
    import hashlib

    from components.core.config import to_yaml

    return hashlib.sha256(to_yaml(cfg).encode()).hexdigest()[:10]


def _times_line(summary: dict) -> str:
    """Each step's share of the summed step time (its parts included), largest first. Steps a
    re-run found committed keep the time of the run that made them."""
    times = {
        step: out["seconds"] + out.get("parts_seconds", 0.0)
        for step, out in summary.items()
        if isinstance(out, dict) and "seconds" in out
    }
    total = sum(times.values())
    if not total:
        return ""
    shares = ", ".join(
        f"{step} {t / total:.0%}" for step, t in sorted(times.items(), key=lambda kv: -kv[1])
    )
    return f"{total / 60:.1f} min in steps: {shares}"


def _print_summary(summary: dict) -> None:
    """The lines a user wants at the end of a pipeline run, each once."""
    from components.core import storage

    ingest, vae = summary["ingest"], summary["train_vae"]
    holdout = vae.get("holdout_psnr")
    lines = {
        "run_id": summary["run_id"],
        "ingested": f"{ingest['ingested']} of {ingest['seen']} files ({ingest['quarantined']} "
        f"quarantined: {ingest.get('reasons', {})})",
        "manifest": summary["validate"]["manifest"],
        "data docs": storage.join(summary["validate"]["data_docs"], "index.html"),
        "quarantine": summary["validate"]["quarantine"],
        "dataset rev": summary["version"]["dataset_rev"],
        "captioner": _captioner_line(summary.get("train_captioner")),
        "captions": _captions_line(summary.get("caption")),
        "vae": f"{vae['vae']} (held-out real footage PSNR "
        f"{'n/a' if holdout is None else f'{holdout:.2f}'} dB)",
        "sweep": _sweep_line(summary["sweep"]),
        "model": summary["sweep"].get("model", summary["sweep"]["dit"]),
        "samples": summary["generate"]["samples"],
        "colour following": _colour_line(summary.get("evaluate")),
    }
    if summary.get("evaluate"):
        lines["evaluation"] = _metrics_line(summary["evaluate"])
        lines["report"] = summary["evaluate"]["report"]
    if registered := summary.get("register"):
        lines["registered"] = f"{registered['model_uri']} (alias {registered['alias']})"
    if promoted := summary.get("promote"):
        lines["promotion"] = f"{promoted['decision']}: {promoted['reason']}"
        if promoted.get("champion_uri"):
            lines["champion"] = f"{promoted['champion_uri']} (version {promoted['champion']})"
    if times := _times_line(summary):
        lines["step times"] = times
    for key, value in lines.items():
        typer.echo(f"  {key:<16} {value}")
    if promoted and promoted.get("champion_uri"):
        from components.core import serving

        cfg = _config(summary.get("profile", "demo"), [])
        url = f"http://{cfg.serve.host}:{cfg.serve.port}"
        typer.echo("  serve it         tessera serve   (then, in another shell:)")
        typer.echo(f"  {serving.curl_example(url)}")


def _captioner_line(trained: dict | None) -> str:
    if not trained:
        return "not run"
    parts = [f"{trained['captioner']} ({trained['steps']} steps)"]
    for style in ("descriptive", "short"):
        if f"bleu4_{style}" in trained:
            parts.append(
                f"{style} BLEU-4 {trained[f'bleu4_{style}']:.1f} "
                f"ROUGE-L {trained[f'rouge_l_{style}']:.3f}"
            )
    accuracy = [
        f"{name} {trained[f'accuracy_{name}']:.2f} (chance {trained[f'chance_{name}']:.2f})"
        for name in ("colour", "shape", "motion", "background")
        if f"accuracy_{name}" in trained
    ]
    if accuracy:
        parts.append("held-out attributes: " + ", ".join(accuracy))
    return "; ".join(parts)


def _captions_line(captioned: dict | None) -> str:
    if not captioned:
        return "not run"
    return (
        f"{captioned['captions']}: {captioned['recaptioned']} clips re-captioned by "
        f"{captioned['captioner_version']} ({captioned['with_original']} had a caption; "
        f"mean token log-prob {captioned['mean_confidence']:.3f})"
    )


def _sweep_line(sweep: dict) -> str:
    fits = ", ".join(
        f"{variant}: "
        + (f"L ~ C^-{fit['b']:.3f}" if "b" in fit else f"{fit['budgets']} budgets")
        + ("" if fit["monotonic"] else " (loss not monotonic)")
        for variant, fit in sweep["fits"].items()
    )
    return f"{sweep['points']} runs, best {sweep['best']} (val loss {sweep['best_val_loss']:.4f}); {fits}"


def _colour_line(evaluated: dict | None) -> str:
    if not evaluated or "colour_accuracy" not in evaluated:
        return "skipped (the colour check runs on the rendered demo corpus)"
    return (
        f"accuracy {evaluated['colour_accuracy']:.2f} vs chance "
        f"{evaluated['colour_chance']:.2f} (p = {evaluated['colour_p_value']:.2g}, "
        f"{evaluated['colour_trials']:.0f} clips)"
    )


def _metrics_line(evaluated: dict) -> str:
    names = [k for k in evaluated if k.startswith(("fvd_", "clip_score_", "framing_cut_share"))]
    extras = ("_n_real", "_n_fake", "_n_frames", "_n_samples", "_hessel", "_torchmetrics")
    shown = [k for k in names if not k.endswith(extras)]
    return ", ".join(f"{k} {evaluated[k]:.4g}" for k in shown[:6]) or "(no metrics)"


# --------------------------------------------------------------------------- registry, serving


@app.command("register")
def register(
    run_id: Annotated[
        str, typer.Option(help="The pipeline run to register; default: the latest one.")
    ] = "",
    model: Annotated[
        str, typer.Option(help="Model dir (vae/ + dit/); default: the run's sweep model.")
    ] = "",
    evaluation: Annotated[
        str, typer.Option(help="evaluation.json; default: the run's evaluate result.")
    ] = "",
    evaluator: Annotated[str, typer.Option(help="Default: the run's train_evaluator.")] = "",
    captioner: Annotated[
        str, typer.Option(help="Prompt expander; default: the run's train_captioner.")
    ] = "",
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Register a pipeline run's models in MLflow (tessera-t2v pyfunc with lineage, tessera-vae,
    tessera-evaluator) and give them the challenger alias; a run registered before returns its
    existing version."""
    from components.core import runner
    from components.orchestration.tasks import PIPELINE, source_run, spec

    cfg = _config(profile, overrides)
    outputs = source_run({"profile": profile, "overrides": overrides or []}, run_id)
    run_id = outputs["run_id"]
    found = {
        "model": model or outputs.get("sweep", {}).get("model", ""),
        "evaluation": evaluation or outputs.get("evaluate", {}).get("result", ""),
        "evaluator": evaluator or outputs.get("train_evaluator", {}).get("evaluator", ""),
        "captioner": captioner or outputs.get("train_captioner", {}).get("captioner", ""),
        "pairs": "" if captioner else outputs.get("train_captioner", {}).get("pairs", ""),
    }
    missing = [k for k in ("model", "evaluation") if not found[k]]
    if missing:
        raise typer.BadParameter(f"run {run_id} has no {missing}; pass --{' --'.join(missing)}")
    ctx = runner.RunContext(run_id, PIPELINE, outputs.get("mlflow_parent_run_id"), True)
    out = runner.run_in_process(spec("register"), cfg, ctx, **found)
    typer.echo(json.dumps(out, indent=2, sort_keys=True, default=str))


@app.command("promote")
def promote(
    version: Annotated[str, typer.Option(help="Model version; default: the challenger.")] = "",
    approve: Annotated[
        bool, typer.Option(help="Approve a version that passed (promote.manual_approval).")
    ] = False,
    rollback: Annotated[
        bool, typer.Option(help="Give champion back to the previous champion.")
    ] = False,
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Gate a registered version against the champion (promote.gates) and move the champion
    alias when it passes; exits 1 when the gate refuses."""
    from components.core import runner
    from components.orchestration.tasks import spec

    cfg = _config(profile, overrides)
    ctx = runner.RunContext.new("tessera_promote")
    out = runner.run_in_process(
        spec("promote"), cfg, ctx, version=version, approve=approve, rollback=rollback
    )
    typer.echo(json.dumps(out, indent=2, sort_keys=True, default=str))
    if out["decision"] == "refused":
        raise typer.Exit(1)


@app.command("serve")
def serve(
    model: Annotated[str, typer.Option(help="Registered model URI.")] = (
        "models:/tessera-t2v@champion"
    ),
    port: Annotated[int | None, typer.Option(help="Default serve.port (5001).")] = None,
    host: Annotated[
        str | None, typer.Option(help="Bind address; default serve.host (loopback).")
    ] = None,
    allow_remote: Annotated[
        bool,
        typer.Option(
            help="Allow a non-loopback --host: only behind a proxy with TLS and auth "
            "(infra/serving.md)."
        ),
    ] = False,
    profile: Profile = "demo",
    overrides: Overrides = None,
) -> None:
    """Serve a registered text-to-video model over HTTP (MLflow's scoring server: POST
    /invocations with a prompt and params; the video comes back as base64 MP4)."""
    from components.core import serving

    code = serving.serve(_config(profile, overrides), model, host, port, allow_remote=allow_remote)
    raise typer.Exit(code)


# --------------------------------------------------------------------------- servers, bench


@app.command("mlflow-server")
def mlflow_server(
    port: int = 5000,
    host: Annotated[str, typer.Option(help="Bind address; loopback by default.")] = "127.0.0.1",
    allow_remote: Annotated[
        bool,
        typer.Option(
            help="Allow a non-loopback --host: MLflow's server has no auth of its own; only "
            "behind a proxy with TLS and auth (infra/README.md)."
        ),
    ] = False,
    foreground: Annotated[bool, typer.Option(help="Run in the foreground until Ctrl-C.")] = False,
    stop: Annotated[bool, typer.Option(help="Stop a background server on this port.")] = False,
) -> None:
    """Run a real MLflow tracking server + registry (SQLite under TESSERA_HOME)."""
    from components.core.config import Environment
    from components.core.serving import LOOPBACK
    from components.core.tracking import MlflowServer, TrackingError

    if not (host in LOOPBACK or host.startswith("127.") or allow_remote):
        raise TrackingError(
            f"refusing to bind the MLflow server to {host}: it has no authentication, so it "
            "listens on loopback by default; behind a reverse proxy with TLS and auth, pass "
            "--allow-remote (infra/README.md)"
        )
    server = MlflowServer(Environment.read().home, host=host, port=port)
    if stop:
        server.stop()
        typer.echo(f"stopped mlflow server on port {port}")
        return
    if foreground:
        os.execve(sys.executable, server.command(), server.environment())
    server.start()
    typer.echo(f"MLflow at {server.url} (log {server.log_path})")
    typer.echo(f"export MLFLOW_TRACKING_URI={server.url}")


@app.command("airflow-ui")
def airflow_ui(port: Annotated[int, typer.Option(help="The api-server's port.")] = 8080) -> None:
    """Airflow on loopback with Tessera's DAGs: api-server, scheduler, dag-processor and
    triggerer (LocalExecutor, SQLite under TESSERA_HOME/airflow) until Ctrl-C; prints the URL and
    the login."""
    from components.orchestration import airflow_local

    airflow_local.serve_ui(port)


@checkpoint_app.command("universal")
def checkpoint_universal(
    path: Annotated[
        Path, typer.Argument(help="A sealed checkpoint directory, e.g. CKPT/step-0000100.")
    ],
    timeout: Annotated[float, typer.Option(help="Seconds ds_to_universal may take.")] = 3600.0,
) -> None:
    """Convert a ZeRO checkpoint into DeepSpeed's universal format (the sibling
    <step>-universal, sealed), so the run resumes on another process count or ZeRO stage."""
    from components.core.trainer import CheckpointRefused, make_universal

    if not path.is_dir():
        raise typer.BadParameter(f"{path} is not a checkpoint directory", param_hint="PATH")
    try:
        out = make_universal(path, timeout_s=timeout)
    except CheckpointRefused as exc:
        typer.echo(f"error: {path} is refused: {exc}", err=True)
        raise typer.Exit(2) from None
    except RuntimeError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"wrote {out} (sealed); resuming with another process count now loads it")


@app.command("config")
def config_show(profile: Profile = "demo", overrides: Overrides = None) -> None:
    """Print the fully resolved configuration (defaults < profile < --set)."""
    from components.core.config import to_yaml

    typer.echo(to_yaml(_config(profile, overrides)), nl=False)


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
    from components.core.config import Environment

    out = Environment.read().home / "bench" / "results.json"
    records = run_benchmarks(_config(profile, overrides), only, out)
    print_table(records, out)


def cli() -> None:
    """Run the command line; known errors become one clear line and ``SystemExit(2)``."""
    from components.core.config import ConfigError
    from components.core.registry import RegistryError
    from components.core.storage import StorageError
    from components.core.tracking import TrackingError
    from components.orchestration.airflow_local import DagRunFailed

    try:
        app()
    except (
        ConfigError,
        StorageError,
        TrackingError,
        RegistryError,
        DagRunFailed,
        FileNotFoundError,
    ) as exc:
        typer.secho(f"error: {exc}", fg="red", err=True)
        raise SystemExit(2) from None


def main() -> None:
    """Console entry point (``tessera``): :func:`cli`, then an exit that cannot abort.

    A finished command (outputs written, exit status decided) ends with ``os._exit`` once
    Python-level shutdown is done: executors stopped and non-daemon threads joined
    (``threading._shutdown``, as finalisation does first), ``atexit`` handlers run (MLflow,
    logging), stdio flushed. What it skips is the interpreter's own finalisation, where Arrow's
    C++ thread pools can be torn down with a worker still alive: the process then dies with
    SIGABRT ("terminate called without an active exception", apache/arrow#34314) after a
    successful run, and an orchestrator reads a failed task. Exceptions other than
    ``SystemExit`` propagate as usual (a traceback, exit status 1).
    """
    import atexit
    import contextlib
    import threading

    try:
        cli()
        code: object = 0
    except SystemExit as exc:
        code = exc.code
    if code is not None and not isinstance(code, int):
        print(code, file=sys.stderr)  # as Python reports SystemExit("message")
        code = 1
    threading._shutdown()  # what finalisation does first: executors told to stop, threads joined
    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # a closed pipe or stream: nothing to flush
            stream.flush()
    os._exit(code or 0)
