"""Find and fetch a saved model wherever the store reaches: a VAE, a DiT, or a whole model.

A *model directory* holds ``vae/`` (``CausalVAE.save_pretrained``, from train_vae) and ``dit/``
(``DiT.save_pretrained`` + ``flow.json``, from train_dit); the train_dit step's output is one.
A part is named by its own directory or by the directory that holds it, as a local path,
``file://`` or ``s3://`` URI; S3 objects are downloaded into a temporary directory that lives as
long as the ``with`` block.
"""

from __future__ import annotations

import contextlib
import hashlib
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from components.core import storage
from components.core.config import TesseraConfig

if TYPE_CHECKING:
    from evaluation.domain import DomainScorer
    from model.generate import VideoGenerator
    from model.vae import CausalVAE

VAE_DIR, DIT_DIR = "vae", "dit"
MODEL_CONFIG = "config.json"
PRODUCERS = {VAE_DIR: "the train_vae step's 'vae' output", DIT_DIR: "the train_dit step's 'dit'"}


def find(uri: str, part: str) -> str:
    """The URI of the ``part`` (``vae`` | ``dit``) directory: ``uri`` itself or ``uri/part``."""
    for candidate in (uri, storage.join(uri, part)):
        if storage.exists(storage.join(candidate, MODEL_CONFIG)):
            return candidate
    raise FileNotFoundError(
        f"no {part.upper()} ({MODEL_CONFIG} + model.safetensors) in {uri} or {uri}/{part}; "
        f"pass {PRODUCERS[part]} or a model directory holding {part}/"
    )


@contextlib.contextmanager
def local_tree(uri: str, only: tuple[str, ...] = ()) -> Iterator[Path]:
    """A local directory with the files under ``uri`` (downloaded when on S3; ``only``: just
    these top-level entries)."""
    if not storage.is_s3(uri):
        path = storage.local_path(uri)
        if not path.is_dir():
            raise storage.StorageNotFound(f"{uri} does not exist or is not a directory")
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="tessera-model-") as tmp:
        prefix = uri.rstrip("/") + "/"
        found = 0
        for obj in storage.list_objects(uri):
            rel = storage.check_relative(obj.uri[len(prefix) :], f"S3 key under {uri}")
            if Path(rel).name == storage.SUCCESS or (only and rel.split("/")[0] not in only):
                continue
            storage.download_file(obj.uri, Path(tmp) / rel)
            found += 1
        if not found:
            raise storage.StorageNotFound(f"{uri} holds no files{f' in {only}' if only else ''}")
        yield Path(tmp)


@contextlib.contextmanager
def fetch(uri: str, part: str) -> Iterator[Path]:
    """A local copy of the ``part`` directory found in ``uri`` (see :func:`find`)."""
    with local_tree(find(uri, part)) as path:
        yield path


def load_vae(uri: str, device: Any = "cpu") -> CausalVAE:
    """A :class:`~model.vae.CausalVAE` from a VAE directory or a directory holding ``vae/``."""
    from model.vae import CausalVAE

    with fetch(uri, VAE_DIR) as path:
        return CausalVAE.from_pretrained(path, device=device)


@contextlib.contextmanager
def model_dir(uri: str) -> Iterator[Path]:
    """A local directory with the model's ``vae/`` and ``dit/`` (only those are downloaded from
    S3; a local one is used in place and :func:`load_generator` names what it lacks)."""
    if not storage.is_s3(uri):
        yield storage.local_path(uri)
        return
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(local_tree(uri, only=(VAE_DIR, DIT_DIR)))
        except storage.StorageNotFound as exc:
            raise storage.StorageNotFound(
                f"{uri} holds no model files; expected vae/ (from train_vae) and dit/ "
                "(from train_dit) under it"
            ) from exc
        yield path


def load_text_encoder(cfg: TesseraConfig) -> Any:
    """The text encoder of ``cfg.text`` (it must be the one the DiT was trained with)."""
    from model.text import load_text_encoder as load

    return load(cfg.text.encoder, max_length=cfg.text.max_length)


EVALUATOR_DIR = "evaluator"


def load_evaluator(
    uri: str,
    cfg: TesseraConfig,
    device: Any = "cpu",
    *,
    text_encoder: Any = None,
    max_frames: int | None = None,
) -> DomainScorer:
    """The in-domain evaluator (``fvd_domain``, ``clip_score_domain``) as a
    :class:`~evaluation.domain.DomainScorer`, from the train_evaluator step's ``evaluator``
    directory or a directory holding ``evaluator/`` (local path, ``file://`` or ``s3://``).

    The text encoder is the one the evaluator was trained with (its config's ``text_encoder``
    and ``text_max_length``, through :func:`load_text_encoder`), unless ``text_encoder`` is
    given; ``sha256`` is that of the weights file. ``max_frames`` defaults to
    ``cfg.train_evaluator.max_frames``.
    """
    import dataclasses

    from evaluation.domain import DomainScorer
    from model.config import WEIGHTS_NAME
    from model.evaluator import VideoTextModel

    found = None
    for candidate in (uri, storage.join(uri, EVALUATOR_DIR)):
        if storage.exists(storage.join(candidate, MODEL_CONFIG)):
            found = candidate
            break
    if found is None:
        raise FileNotFoundError(
            f"no evaluator ({MODEL_CONFIG} + {WEIGHTS_NAME}) in {uri} or {uri}/{EVALUATOR_DIR}; "
            "pass the train_evaluator step's 'evaluator' output"
        )
    with local_tree(found) as path:
        model = VideoTextModel.from_pretrained(path, device=device)
        digest = hashlib.sha256()
        with open(path / WEIGHTS_NAME, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    if text_encoder is None:
        trained = dataclasses.replace(
            cfg.text, encoder=model.config.text_encoder, max_length=model.config.text_max_length
        )
        text_encoder = load_text_encoder(dataclasses.replace(cfg, text=trained))
    if hasattr(text_encoder, "to"):
        text_encoder = text_encoder.to(device)
    frames = cfg.train_evaluator.max_frames if max_frames is None else max_frames
    return DomainScorer(model, text_encoder, digest.hexdigest(), max_frames=frames, device=device)


def default_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def sample(
    generator: VideoGenerator, cfg: TesseraConfig, requests: list[dict[str, Any]]
) -> tuple[list[Any], float]:
    """``generator.generate_many(requests)`` with ``cfg.generate``'s solver settings, in packs of
    at most ``train_dit.token_budget`` tokens (a budget training fits with activations kept for
    backward, so guidance's doubled rows fit too); returns the videos and the seconds taken."""
    import time

    started = time.perf_counter()
    gcfg = cfg.generate
    videos = generator.generate_many(
        requests,
        steps=gcfg.steps,
        guidance=gcfg.guidance,
        sampler=gcfg.sampler,
        token_budget=cfg.train_dit.token_budget,
    )
    return videos, time.perf_counter() - started


def load_generator(cfg: TesseraConfig, directory: Path, device: Any = None) -> VideoGenerator:
    """A VideoGenerator from a local model directory, with ``cfg.generate``'s limits."""
    from model.generate import VideoGenerator, check_pretrained

    check_pretrained(directory / VAE_DIR, directory / DIT_DIR)  # before the text encoder loads
    return VideoGenerator.from_pretrained(
        directory / VAE_DIR,
        directory / DIT_DIR,
        load_text_encoder(cfg),
        device=device or default_device(),
        max_frames=cfg.generate.max_frames,
        max_pixels=cfg.generate.max_pixels,
    )


CAPTIONER_DIR = "captioner"


def load_captioner(uri: str, device: Any = "cpu") -> tuple[Any, Any]:
    """``(Captioner in eval mode, its CaptionTokenizer)`` from the train_captioner step's
    ``captioner`` directory or a directory holding ``captioner/`` (local path, ``file://`` or
    ``s3://``); the tokenizer is the one named in the model's config."""
    from model.captioner import Captioner, load_caption_tokenizer
    from model.config import WEIGHTS_NAME

    for candidate in (uri, storage.join(uri, CAPTIONER_DIR)):
        if storage.exists(storage.join(candidate, MODEL_CONFIG)):
            with local_tree(candidate) as path:
                model = Captioner.from_pretrained(path, device=device).eval()
            return model, load_caption_tokenizer(model.config.tokenizer)
    raise FileNotFoundError(
        f"no captioner ({MODEL_CONFIG} + {WEIGHTS_NAME}) in {uri} or {uri}/{CAPTIONER_DIR}; "
        "pass the train_captioner step's 'captioner' output"
    )
