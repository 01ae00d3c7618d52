"""Version the validated dataset with DVC: one git commit per dataset revision.

The dataset repository lives at ``TESSERA_HOME/dataset`` (``git init`` + ``dvc init`` on first
use) and holds one DVC-tracked directory::

    data/manifest.parquet           the validated manifest, byte for byte
    data/clips/<clip_id><ext>       every clip it references (copied from local paths or s3://)
    data/captions.parquet           when captions are given

:func:`run` lays that out, runs ``dvc add data``, commits ``data.dvc`` and pushes the objects to
the remote: ``version.remote`` or ``TESSERA_HOME/dvc-remote`` (an ``s3://bucket/prefix`` remote
gets ``endpointurl`` from ``AWS_ENDPOINT_URL`` in the untracked ``.dvc/config.local``). The git
commit sha is the dataset revision; :func:`checkout` restores any revision byte for byte.

**What training reads.** The step's output ``manifest.parquet`` is the versioned dataset as the
training steps read it: each row's ``uri`` is the clip's content-addressed object in the DVC
remote (``files/md5/ab/cdef…``, immutable), ``source_uri`` where it was ingested from, and the
Parquet metadata holds the :class:`~components.core.manifest.Lineage` (revision, md5, and the
remote object of the versioned manifest itself). So a training run reads exactly revision
``dataset_rev``, whatever happens to the raw files, and tags its MLflow run with it.

Concurrency: DVC and git commands cannot run concurrently in one workspace (DVC's own
``rwlock`` fails fast instead of waiting, git has ``index.lock``), and DVC's Python API is not
thread-safe. Every operation on the repository therefore holds an exclusive ``fcntl.flock`` on
``TESSERA_HOME/dataset.lock`` (per open file, so it serialises threads as well as processes,
also across Airflow workers sharing a home on one machine); versions and checkouts queue up.

DVC runs in-process through ``dvc.repo.Repo`` (a ``dvc`` subprocess costs 1-3 s of start-up per
command, most of a small version step); git runs as a subprocess. Repository state is opened and
closed per operation, so nothing DVC holds outlives a call.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import urlparse

import pyarrow as pa
import yaml

from components.core import manifest as mf
from components.core import storage, tracking
from components.core.config import Environment, TesseraConfig
from components.core.manifest import Lineage
from components.core.runner import StepResult, StepSpec

REMOTE_NAME = "tessera"
DATA_DIR = "data"
GIT_USER = ("tessera", "tessera@localhost")
GIT_TIMEOUT_S = 300  # one local git command; a hang (a lock, a credential prompt) stops here
CLIP_ID = re.compile(r"[0-9a-f]{64}")  # ingest's sha256 of the clip's bytes
EXTENSION = re.compile(r"(\.[a-z0-9]{1,10})?")


class VersionError(RuntimeError):
    """A git or DVC command failed; the message has the command, its output and what to do."""


# --------------------------------------------------------------------------- the step


def run(
    cfg: TesseraConfig, workdir: Path, manifest: str, captions: str | None = None
) -> StepResult:
    """Commit the dataset behind ``manifest`` (+ ``captions``) as a new revision and push it.

    Re-versioning identical data makes no new commit: the current revision is returned.
    """
    env = Environment.read()
    repo, remote = dataset_repo(env), remote_url(cfg, env)
    table = mf.read_table(manifest)
    with dataset_lock(env):
        _ensure_repo(repo)
        _configure_remote(repo, remote, env)
        data = repo / DATA_DIR
        _stage_clips(table, data / "clips")
        storage.download_file(manifest, data / "manifest.parquet")
        if captions:
            storage.download_file(captions, data / "captions.parquet")
        else:
            (data / "captions.parquet").unlink(missing_ok=True)
        with _dvc_repo(repo) as dvc:
            dvc.add(str(repo / DATA_DIR))  # absolute: the API resolves paths from the cwd
        _git(repo, "add", f"{DATA_DIR}.dvc", ".gitignore", ".dvc/config")
        if _git(repo, "diff", "--cached", "--quiet", check=False).returncode:
            message = f"dataset: {table.num_rows} clips from {manifest}"
            _git(repo, "commit", "-q", "-m", message)
        with _dvc_repo(repo) as dvc:
            dvc.push(remote=REMOTE_NAME)
        rev = _git(repo, "rev-parse", "HEAD").stdout.strip()
        md5 = dataset_md5(repo)
        objects = remote_objects(repo, remote, md5)
        total_bytes = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())

    lineage = Lineage(manifest=objects["manifest.parquet"], dataset_rev=rev, dataset_md5=md5)
    versioned = versioned_manifest(table, objects)
    mf.write_table(versioned, str(Path(workdir) / "manifest.parquet"), lineage=lineage)
    tracking.log_lineage(lineage, context="dataset")
    return StepResult(
        files={"manifest": "manifest.parquet"},
        values={
            "dataset_rev": rev,
            "dataset_md5": md5,
            "num_clips": table.num_rows,
            "remote": remote,
        },
        metrics={"num_clips": float(table.num_rows), "dataset_bytes": float(total_bytes)},
    )


def checkout(cfg: TesseraConfig, rev: str, out: Path) -> Path:
    """Restore dataset revision ``rev`` (sha, tag, branch) into ``out``; returns ``out``.

    ``out`` receives the contents of ``data/`` (``manifest.parquet``, ``clips/``, …) and must be
    empty or missing. Objects come from the local DVC cache, else are pulled from the remote
    recorded in that revision's ``.dvc/config`` (``cfg`` is not needed: the revision knows).
    """
    from dvc.exceptions import CheckoutError

    env = Environment.read()
    repo = dataset_repo(env)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise VersionError(f"checkout target {out} is not empty; pass a new or empty directory")
    if not (repo / ".dvc").is_dir():
        raise VersionError(f"no dataset repository at {repo}; run the version step first")
    with dataset_lock(env), tempfile.TemporaryDirectory(prefix="tessera-dataset-") as tmp:
        found = _git(repo, "rev-parse", "--verify", "--quiet", f"{rev}^{{commit}}", check=False)
        if found.returncode:
            raise VersionError(
                f"dataset revision {rev!r} not found in {repo}; see `git -C {repo} log`"
            )
        sha = found.stdout.strip()
        if _git(repo, "cat-file", "-e", f"{sha}:{DATA_DIR}.dvc", check=False).returncode:
            raise VersionError(f"revision {rev!r} of {repo} holds no dataset ({DATA_DIR}.dvc)")
        tree = Path(tmp) / "worktree"
        _git(repo, "worktree", "add", "-q", "--detach", str(tree), sha)
        try:
            local = repo / ".dvc" / "config.local"
            if local.is_file():  # remote endpoint of this machine
                shutil.copyfile(local, tree / ".dvc" / "config.local")
            shared_cache = {"cache": {"dir": str(repo / ".dvc" / "cache")}}  # no re-download
            with _dvc_repo(tree, config=shared_cache) as dvc:
                try:
                    dvc.checkout(targets=[str(tree / f"{DATA_DIR}.dvc")])
                except CheckoutError:  # objects missing from the local cache
                    dvc.pull(targets=[str(tree / f"{DATA_DIR}.dvc")], remote=REMOTE_NAME)
            if out.exists():
                out.rmdir()  # empty, checked above
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(tree / DATA_DIR, out)
        finally:
            _git(repo, "worktree", "remove", "--force", str(tree), check=False)
            _git(repo, "worktree", "prune", check=False)
    return out


# --------------------------------------------------------------------------- what training reads


def remote_objects(repo: Path, remote: str, md5: str) -> dict[str, str]:
    """``relpath`` under ``data/`` -> URI of its object in the DVC remote, from the directory
    listing (``<md5>.dir``) DVC keeps in the local cache. DVC 3 lays out both cache and remote
    as ``files/md5/<first two hex digits>/<the rest>``."""
    listing = repo / ".dvc" / "cache" / "files" / "md5" / md5[:2] / md5[2:]
    root = remote if storage.is_s3(remote) else str(storage.local_path(remote).absolute())
    return {
        entry["relpath"]: storage.join(root, "files", "md5", entry["md5"][:2], entry["md5"][2:])
        for entry in json.loads(listing.read_text())
    }


def versioned_manifest(table: pa.Table, objects: dict[str, str]) -> pa.Table:
    """``table`` reading its clips from the DVC remote: ``uri`` -> the object of
    ``clips/<clip_id><ext>``, ``source_uri`` -> where the clip was ingested from."""
    rows = _clip_rows(table)
    table = table.drop_columns([c for c in ("uri", "source_uri") if c in table.column_names])
    uris = [objects[f"clips/{_clip_file(r)}"] for r in rows]
    sources = [r["source_uri"] or r["uri"] for r in rows]
    table = table.add_column(1, "uri", pa.array(uris, pa.string()))
    return table.append_column("source_uri", pa.array(sources, pa.string()))


# --------------------------------------------------------------------------- repository


def dataset_repo(env: Environment | None = None) -> Path:
    return (env or Environment.read()).home / "dataset"


def remote_url(cfg: TesseraConfig, env: Environment | None = None) -> str:
    """``version.remote`` or the local default ``TESSERA_HOME/dvc-remote``."""
    return cfg.version.remote or str((env or Environment.read()).home / "dvc-remote")


def dataset_md5(repo: Path, rev: str | None = None) -> str:
    """md5 of the ``data`` directory in ``data.dvc`` (at ``rev``, else in the worktree)."""
    if rev is None:
        text = (repo / f"{DATA_DIR}.dvc").read_text()
    else:
        text = _git(repo, "show", f"{rev}:{DATA_DIR}.dvc").stdout
    return yaml.safe_load(text)["outs"][0]["md5"]


@contextlib.contextmanager
def dataset_lock(env: Environment | None = None) -> Iterator[None]:
    """Exclusive lock on ``TESSERA_HOME/dataset.lock`` (blocks until free)."""
    home = (env or Environment.read()).home
    home.mkdir(parents=True, exist_ok=True)
    with open(home / "dataset.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ensure_repo(repo: Path) -> None:
    repo.mkdir(parents=True, exist_ok=True)
    if not (repo / ".git").exists():
        _git(repo, "init", "-q")
    _git(repo, "config", "user.name", GIT_USER[0])
    _git(repo, "config", "user.email", GIT_USER[1])
    _git(repo, "config", "commit.gpgsign", "false")
    if not (repo / ".dvc").is_dir():
        from dvc.repo import Repo

        _quiet_dvc()
        Repo.init(str(repo)).close()
        with _dvc_config(repo, "repo") as conf:
            conf["core"].update({"analytics": False, "check_update": False})
        _git(repo, "add", ".dvc", ".dvcignore")
        _git(repo, "commit", "-q", "-m", "dataset repository")


def _configure_remote(repo: Path, remote: str, env: Environment) -> None:
    """Point the default remote at ``remote``; an S3 endpoint/region stays machine-local."""
    if not storage.is_s3(remote):
        remote = str(storage.local_path(remote).absolute())
        Path(remote).mkdir(parents=True, exist_ok=True)
    with _dvc_config(repo, "repo") as conf:
        conf["core"]["remote"] = REMOTE_NAME
        conf["remote"][REMOTE_NAME] = {"url": remote}
    local: dict[str, str] = {}
    if storage.is_s3(remote) and env.aws_endpoint_url:
        local["endpointurl"] = env.aws_endpoint_url
    if storage.is_s3(remote) and env.aws_region:
        local["region"] = env.aws_region
    with _dvc_config(repo, "local") as conf:
        conf["remote"].pop(REMOTE_NAME, None)
        if local:
            conf["remote"][REMOTE_NAME] = local


@contextlib.contextmanager
def _dvc_repo(root: Path, config: dict | None = None) -> Iterator[Any]:
    """An open ``dvc.repo.Repo`` at ``root``; DVC errors become :class:`VersionError`."""
    from dvc.exceptions import DvcException
    from dvc.repo import Repo

    _quiet_dvc()
    try:
        with Repo(str(root), config=config) as repo:
            yield repo
    except DvcException as exc:
        raise VersionError(
            f"DVC failed in {root}: {exc}\n"
            "Check the remote (version.remote) and its credentials/endpoint (AWS_ENDPOINT_URL), "
            f"or inspect the repository with `dvc status -c` in {root}."
        ) from exc


def _quiet_dvc() -> None:
    """DVC logs git hints ("To track the changes with git…") at INFO; keep warnings only."""
    logging.getLogger("dvc").setLevel(logging.WARNING)


@contextlib.contextmanager
def _dvc_config(repo: Path, level: str) -> Iterator[dict]:
    """Edit ``.dvc/config`` (level "repo") or ``.dvc/config.local`` (level "local") in-process.

    DVC's own config class validates the result; a ``dvc config`` subprocess would cost seconds.
    """
    from dvc.config import Config

    with Config(dvc_dir=str(repo / ".dvc")).edit(level) as conf:
        yield conf


def _stage_clips(table, clips: Path) -> None:
    """Copy every referenced clip to ``clips/<clip_id><ext>``; drop clips no longer listed.

    ``clip_id`` is the sha256 of the bytes, so a file already there under that name with the
    manifest's byte count is that clip and is not copied again.
    """
    clips.mkdir(parents=True, exist_ok=True)
    wanted: set[str] = set()
    for row in _clip_rows(table):
        name = _clip_file(row)
        wanted.add(name)
        dst = clips / name
        if dst.is_file() and row["bytes"] is not None and dst.stat().st_size == row["bytes"]:
            continue
        storage.download_file(row["uri"], dst)
    for stale in clips.iterdir():
        if stale.name not in wanted:
            stale.unlink()


def _clip_rows(table: pa.Table) -> list[dict[str, Any]]:
    columns = [c for c in ("clip_id", "uri", "bytes", "source_uri") if c in table.column_names]
    return [{"source_uri": None, **r} for r in table.select(columns).to_pylist()]


def _clip_file(row: dict[str, Any]) -> str:
    """A clip's file name in the dataset: its sha256 and the extension it was ingested with
    (a versioned manifest's ``uri`` is an object without one)."""
    clip_id, ext = row["clip_id"], _extension(row["source_uri"] or row["uri"])
    if not CLIP_ID.fullmatch(str(clip_id)) or not EXTENSION.fullmatch(ext):
        raise VersionError(
            f"refusing clip {clip_id!r} ({row['uri']}): a clip id is the sha256 of its bytes "
            "(64 hex digits) and an extension, if any, a dot and up to 10 letters or digits; re-run "
            "`tessera ingest` to rebuild the manifest rather than editing it"
        )
    return f"{clip_id}{ext}"


def _extension(uri: str) -> str:
    path = urlparse(uri).path if "://" in uri else uri
    return PurePosixPath(path).suffix.lower()


def _git(repo: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return _call(["git", *args], repo, check)


def _call(cmd: list[str], cwd: Path, check: bool) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=GIT_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise VersionError(
            f"`{' '.join(cmd)}` did not finish within {GIT_TIMEOUT_S} s in {cwd} and was "
            "stopped; is another git process holding the repository's lock (.git/index.lock)?"
        ) from None
    if check and proc.returncode:
        output = (proc.stderr.strip() or proc.stdout.strip())[-2000:]
        raise VersionError(
            f"`{' '.join(cmd)}` failed in {cwd} (exit {proc.returncode}):\n{output}\n"
            "Inspect the dataset repository with git there."
        )
    return proc


STEP = StepSpec("version", run)
