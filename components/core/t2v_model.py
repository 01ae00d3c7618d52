"""The ``tessera-t2v`` MLflow model, logged *from code*: MLflow runs this file to build the model
(``mlflow.models.set_model``), so nothing is pickled and the model loads with
``MLFLOW_ALLOW_PICKLE_DESERIALIZATION=false``.

Artifacts (see :func:`components.core.registry.log_t2v_model`): ``vae/`` and ``dit/``
(safetensors + JSON configs, ``dit/flow.json``), ``text/`` (``text.json``: the encoder spec the
DiT was trained with; the weights too for Hugging Face towers, the bundled MiniLM is a package
reference), ``config/config.yaml`` (the run's resolved config: sampler, prompt expansion) and,
when prompt expansion is built in, ``expander/`` (the train_captioner output and its pairs).

The model config (``model_config``, overridable at load time) holds the request limits of
``serve`` and the registry identity (``model_name``, ``model_version``), which the serving
launcher fills in once it has resolved ``models:/name@alias``.

Request: a DataFrame with a ``prompt`` column (one clip per row, at most ``max_batch`` rows) and
params ``frames``, ``height``/``width`` (0: from ``aspect``), ``aspect``, ``steps``, ``guidance``,
``seed`` (row ``i`` uses ``seed + i``), ``expand_prompt``, ``negative_prompt``, ``format``
(frames, steps and guidance 0 or absent: the model config's ``default_*``)
(``mp4`` | ``gif`` | ``png``, png for one frame). Response: one dict per row with the video as a
plain base64 string and its metadata. A bad request raises an ``MlflowException`` with
``INVALID_PARAMETER_VALUE`` (HTTP 400 from the scoring server) naming the field and its limit.
"""

from __future__ import annotations

import base64
import io
import json
import math
import tempfile
import threading
import time
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import mlflow
from mlflow.pyfunc import PythonModel

FORMATS = {"mp4": "video/mp4", "gif": "image/gif", "png": "image/png"}
FPS = 12
# name -> (MLflow type, default); frames/steps/guidance 0 = the model config's default_* (the
# server's serve.default_*: a signature default is fixed at registration, the config is not)
PARAMS = {
    "frames": ("long", 0),
    "height": ("long", 0),
    "width": ("long", 0),
    "aspect": ("string", "16:9"),
    "steps": ("long", 0),
    "guidance": ("double", 0.0),
    "seed": ("long", 0),
    "expand_prompt": ("boolean", False),
    "negative_prompt": ("string", ""),
    "format": ("string", "mp4"),
}


class RequestError(ValueError):
    """A request outside the model's limits; the message names the field and the limit."""


@dataclass(frozen=True)
class Limits:
    """What one request may ask for (``serve`` config; the model config at load time)."""

    max_batch: int = 4
    max_prompt_chars: int = 2000
    max_frames: int = 33
    max_pixels: int = 256 * 256
    max_voxels: int = 33 * 128 * 128
    max_steps: int = 100
    max_guidance: float = 20.0
    default_frames: int = 17
    default_steps: int = 30
    default_guidance: float = 4.0

    def __post_init__(self) -> None:
        for name, top in (("frames", self.max_frames), ("steps", self.max_steps)):
            default = getattr(self, f"default_{name}")
            if not 1 <= default <= top:
                raise ValueError(f"default_{name}={default} must be in 1..max_{name}={top}")
        if not 1.0 <= self.default_guidance <= self.max_guidance:
            raise ValueError(
                f"default_guidance={self.default_guidance} must be in 1..max_guidance="
                f"{self.max_guidance}"
            )

    @classmethod
    def from_config(cls, config: dict[str, Any] | None) -> Limits:
        config = config or {}
        return cls(
            **{f.name: type(f.default)(config[f.name]) for f in fields(cls) if f.name in config}
        )


def limits_of(serve: Any) -> dict[str, Any]:
    """The :class:`Limits` fields of a ``ServeConfig`` (what the model config carries)."""
    return {f.name: getattr(serve, f.name) for f in fields(Limits)}


def params_schema() -> Any:
    """The signature's params: :data:`PARAMS`."""
    from mlflow.types import ParamSchema, ParamSpec

    return ParamSchema([ParamSpec(name, kind, value) for name, (kind, value) in PARAMS.items()])


def signature() -> Any:
    """Input: a ``prompt`` string column; output: one dict per row; params: :func:`params_schema`."""
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(inputs=Schema([ColSpec("string", "prompt")]), params=params_schema())


def check_request(prompts: list[Any], params: dict[str, Any], limits: Limits) -> dict[str, Any]:
    """Validate one request against ``limits``; returns the normalised params.

    Raises :class:`RequestError` naming the field, the value and the limit.
    """
    if not prompts:
        raise RequestError("the request has no rows: send at least one prompt")
    if len(prompts) > limits.max_batch:
        raise RequestError(
            f"{len(prompts)} prompts exceed max_batch={limits.max_batch}: send fewer per request"
        )
    for i, prompt in enumerate(prompts):
        if not isinstance(prompt, str):
            raise RequestError(f"prompt (row {i}) must be a string, got {type(prompt).__name__}")
        if not prompt.strip():
            raise RequestError(f"prompt (row {i}) is empty: describe the video to generate")
        if len(prompt) > limits.max_prompt_chars:
            raise RequestError(
                f"prompt (row {i}) has {len(prompt)} characters; max_prompt_chars="
                f"{limits.max_prompt_chars}"
            )
    p = {name: params.get(name, default) for name, (_, default) in PARAMS.items()}
    for name in ("frames", "height", "width", "steps", "seed"):
        if isinstance(p[name], bool) or not isinstance(p[name], int):
            raise RequestError(f"{name} must be an integer, got {p[name]!r}")
    guidance = p["guidance"]
    if isinstance(guidance, bool) or not isinstance(guidance, (int, float)):
        raise RequestError(f"guidance must be a number, got {guidance!r}")
    p["frames"] = p["frames"] or limits.default_frames  # 0: the model's default
    p["steps"] = p["steps"] or limits.default_steps
    p["guidance"] = guidance = guidance or limits.default_guidance
    if not 1 <= p["frames"] <= limits.max_frames:
        raise RequestError(f"frames={p['frames']} must be in 1..max_frames={limits.max_frames}")
    if not 1 <= p["steps"] <= limits.max_steps:
        raise RequestError(f"steps={p['steps']} must be in 1..max_steps={limits.max_steps}")
    if not (math.isfinite(guidance) and 1.0 <= guidance <= limits.max_guidance):
        raise RequestError(
            f"guidance={guidance} must be in 1..max_guidance={limits.max_guidance} (1 = none)"
        )
    if p["seed"] < 0:
        raise RequestError(f"seed={p['seed']} must be >= 0")
    if (p["height"] == 0) != (p["width"] == 0) or p["height"] < 0 or p["width"] < 0:
        raise RequestError(
            f"height={p['height']}, width={p['width']}: give both (> 0), or neither to use aspect"
        )
    if p["height"] and p["height"] * p["width"] > limits.max_pixels:
        raise RequestError(
            f"height x width = {p['height']}x{p['width']} = {p['height'] * p['width']} pixels "
            f"exceeds max_pixels={limits.max_pixels}"
        )
    if p["height"] and p["frames"] * p["height"] * p["width"] > limits.max_voxels:
        raise RequestError(
            f"frames x height x width = {p['frames'] * p['height'] * p['width']} exceeds "
            f"max_voxels={limits.max_voxels}: ask for fewer frames or a smaller size"
        )
    if p["format"] not in FORMATS:
        raise RequestError(f"format={p['format']!r} must be one of {sorted(FORMATS)}")
    if p["format"] == "png" and p["frames"] != 1:
        raise RequestError("format='png' is for one frame (frames=1); use mp4 or gif for video")
    if (
        not isinstance(p["negative_prompt"], str)
        or len(p["negative_prompt"]) > limits.max_prompt_chars
    ):
        raise RequestError(
            f"negative_prompt must be a string of at most {limits.max_prompt_chars} characters"
        )
    return p


def encode(video: Any, fmt: str) -> bytes:
    """A clip (3, T, H, W) in [-1, 1] as ``fmt`` file bytes (odd sides padded for mp4)."""
    import numpy as np
    from PIL import Image

    from components.core import media

    frames = media.to_uint8(video)  # (T, H, W, 3)
    if fmt == "png":
        buffer = io.BytesIO()
        Image.fromarray(frames[0]).save(buffer, format="PNG")
        return buffer.getvalue()
    if fmt == "gif":
        buffer = io.BytesIO()
        images = [Image.fromarray(f) for f in frames]
        images[0].save(
            buffer,
            format="GIF",
            save_all=True,
            append_images=images[1:],
            duration=1000 // FPS,
            loop=0,
        )
        return buffer.getvalue()
    _, height, width, _ = frames.shape
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    with tempfile.TemporaryDirectory(prefix="tessera-serve-") as tmp:
        path = media.encode_video(Path(tmp) / "clip.mp4", frames, FPS)
        return path.read_bytes()


class TextToVideo(PythonModel):
    """The generator behind ``models:/tessera-t2v@champion`` (see the module docstring)."""

    def load_context(self, context) -> None:
        import yaml

        from components.core import artifacts
        from components.core.config import TesseraConfig, from_dict
        from model.generate import VideoGenerator
        from model.text import load_text_encoder

        config = dict(context.model_config or {})
        self.limits = Limits.from_config(config)
        self.identity = {
            "name": config.get("model_name", ""),
            "version": str(config.get("model_version", "")),
            "run_id": config.get("tessera_run_id", ""),
        }
        paths = {k: Path(v) for k, v in context.artifacts.items()}
        raw = yaml.safe_load((paths["config"] / "config.yaml").read_text())
        self.cfg = from_dict(TesseraConfig, raw)
        text = json.loads((paths["text"] / "text.json").read_text())
        spec = text["encoder"]
        if text.get("weights"):  # a Hugging Face tower shipped with the model
            spec = f"{spec.split(':', 1)[0]}:{paths['text'] / text['weights']}"
        self.expander_dir = paths.get("expander")
        self._expander: tuple[Any, list] | None = None
        self.generator = VideoGenerator.from_pretrained(
            paths["vae"],
            paths["dit"],
            load_text_encoder(spec, max_length=int(text["max_length"])),
            device=artifacts.default_device(),
            max_frames=self.limits.max_frames,
            max_pixels=self.limits.max_pixels,
        )
        self.lock = (
            threading.Lock()
        )  # one generation at a time per process; the server bounds the queue

    # --------------------------------------------------------------------------- expansion

    def _expand(self, prompts: list[str], seed: int) -> list[Any]:
        import dataclasses

        from components.core import expansion

        if self._expander is None:
            xc = self.cfg.expand
            if self.expander_dir is not None:
                pairs = self.expander_dir / "pairs.json"
                xc = dataclasses.replace(
                    xc,
                    backend="builtin",
                    model=str(self.expander_dir / "captioner"),
                    examples=str(pairs) if pairs.is_file() else xc.examples,
                )
            elif xc.backend == "builtin":
                raise RequestError(
                    "expand_prompt: this model was registered without a prompt expander (no "
                    "trained captioner); register it from a run with train_captioner, or send "
                    "expand_prompt=false"
                )
            self._expander = expansion.load_backend(dataclasses.replace(self.cfg, expand=xc))
        backend, examples = self._expander
        return [
            expansion.expand(p, self.cfg, seed=seed + i, examples=examples, backend=backend)
            for i, p in enumerate(prompts)
        ]

    # --------------------------------------------------------------------------- predict

    def predict(self, context, model_input, params=None):  # no hints: MLflow reads them as a schema
        from mlflow.exceptions import MlflowException
        from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

        try:
            return self._predict(_prompts(model_input), dict(params or {}))
        except (RequestError, ValueError) as e:
            raise MlflowException(str(e), error_code=INVALID_PARAMETER_VALUE) from e

    def _predict(self, prompts: list[Any], params: dict[str, Any]) -> list[dict[str, Any]]:
        p = check_request(prompts, params, self.limits)
        generator = self.generator
        if p["height"]:
            size = (p["frames"], p["height"], p["width"])
        else:
            size = generator.video_size(p["aspect"], p["frames"])
        generator.check_size(*size)
        if size[0] * size[1] * size[2] > self.limits.max_voxels:
            raise RequestError(
                f"{size[0]} frames x {size[1]}x{size[2]} exceeds max_voxels={self.limits.max_voxels}"
            )
        expansions = (
            self._expand(prompts, p["seed"]) if p["expand_prompt"] else [None] * len(prompts)
        )
        requests = [
            {
                "prompt": e.text if e else prompt,
                "frames": size[0],
                "height": size[1],
                "width": size[2],
                "seed": p["seed"] + i,
                **({"negative": p["negative_prompt"]} if p["negative_prompt"] else {}),
            }
            for i, (prompt, e) in enumerate(zip(prompts, expansions, strict=True))
        ]
        with self.lock:
            started = time.perf_counter()
            videos = generator.generate_many(
                requests,
                steps=p["steps"],
                guidance=float(p["guidance"]),
                sampler=self.cfg.generate.sampler,
                token_budget=self.cfg.train_dit.token_budget,
            )
            seconds = time.perf_counter() - started
        out = []
        for prompt, e, request, video in zip(prompts, expansions, requests, videos, strict=True):
            data = encode(video, p["format"])
            out.append(
                {
                    "video": base64.b64encode(data).decode("ascii"),
                    "format": p["format"],
                    "mime_type": FORMATS[p["format"]],
                    "frames": size[0],
                    "height": size[1],
                    "width": size[2],
                    "fps": FPS,
                    "seed": request["seed"],
                    "steps": p["steps"],
                    "guidance": float(p["guidance"]),
                    "prompt": prompt,
                    "expanded_prompt": e.text if e else None,
                    "expansion": json.dumps(e.metadata) if e else None,
                    "model_name": self.identity["name"],
                    "model_version": self.identity["version"],
                    "seconds": round(seconds / len(prompts), 4),
                }
            )
        return out


def _prompts(model_input: Any) -> list[Any]:
    """The prompts of a request: a DataFrame's ``prompt`` column, a list, or one string."""
    if hasattr(model_input, "columns"):
        if "prompt" not in model_input.columns:
            raise RequestError(
                f"the input has columns {list(model_input.columns)}; it needs a 'prompt' column"
            )
        return list(model_input["prompt"])
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        if "prompt" not in model_input:
            raise RequestError(f"the input has keys {sorted(model_input)}; it needs 'prompt'")
        value = model_input["prompt"]
        return list(value) if isinstance(value, (list, tuple)) else [value]
    if isinstance(model_input, (list, tuple)):
        return list(model_input)
    raise RequestError(
        f"cannot read prompts from a {type(model_input).__name__}; send a 'prompt' column"
    )


mlflow.models.set_model(TextToVideo())
