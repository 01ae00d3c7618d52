"""DiT training on fabricated latent shards: packing, validation, DeepSpeed runs, resume, export."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from components.core import trainer
from components.core.config import load_config
from components.core.latents import read_index
from components.core.trainer import launch
from components.steps import train_dit
from components.steps.train_dit import data as dit_data
from components.steps.train_dit import worker
from model.diffusion import FlowConfig, FlowMatching
from model.dit import DiT
from model.generate import FLOW_CONFIG_NAME
from model.patches import PackedBatch, clip_tokens
from tests.testing_utils.data import write_fake_latents
from tests.testing_utils.step_tester import StepTesterMixin

TINY = [
    "train_dit.size=tessera-tiny",
    "train_dit.token_budget=128",
    "train_dit.train.micro_batch=1",
    "train_dit.train.lr=0.003",
    "train_dit.train.warmup_steps=2",
    "train_dit.train.log_every=2",
    "train_dit.sample_every=0",
    "sweep.captions=[original]",  # the fake latents were not re-captioned
]


def tiny_cfg(*overrides: str):
    return load_config("tiny", [*TINY, *overrides])


@pytest.fixture(scope="module")
def latents(tmp_path_factory) -> str:
    return write_fake_latents(tmp_path_factory.mktemp("latents"))


def _data(latents: str, val_clips: int = 4):
    index = read_index(latents)
    train_rows, val_rows, heldout = dit_data.split_clips(index, val_clips)
    return dit_data.load_latents(latents, train_rows), dit_data.load_latents(latents, val_rows)


# --------------------------------------------------------------------------- data + packing


def test_latents_load_in_clip_order_with_null_text_for_uncaptioned(latents):
    data, val = _data(latents)
    assert data.clip_ids == sorted(data.clip_ids) and len(data) == 12
    assert val.clip_ids == ["clip0012", "clip0013"]  # the val split, not held-out train clips
    assert data.channels == 4 and data.text_dim == 16
    assert {"image", "video"} == set(data.kinds)
    for i, clip_id in enumerate(data.clip_ids):
        captioned = int(clip_id[4:]) % 4 != 3
        assert bool(data.text_masks[i].any()) == captioned == bool(data.captions[i])
    text, mask = data.text_batch([3, 0])  # clip 3 is uncaptioned: padded, all-False row
    assert text.shape == (2, 6, 16) and not mask[0].any() and mask[1].any()


def test_short_captions_replace_long_ones_at_the_configured_rate(latents):
    data, _ = _data(latents)
    assert data.short_texts == [None] * len(data)  # these shards carry no short captions
    data.short_texts = [
        torch.full((2, 16), float(i)) if i % 2 == 0 else None for i in range(len(data))
    ]
    data.short_masks = [
        torch.ones(2, dtype=torch.bool) if s is not None else None for s in data.short_texts
    ]
    text, mask = data.text_batch([0, 1, 2], short=[True, True, False])
    assert torch.equal(text[0, :2], data.short_texts[0]) and mask[0].sum() == 2
    assert torch.equal(text[1, : data.texts[1].shape[0]], data.texts[1])  # has no short caption
    assert torch.equal(text[2, : data.texts[2].shape[0]], data.texts[2])  # not picked

    def short_rows(rate, seed):
        gen = torch.Generator().manual_seed(seed)
        _, text, mask = dit_data.make_batch(data, [0, 2, 4], (1, 2, 2), 512, 0.0, gen, rate)
        return [bool(mask[r].sum() == 2 and (text[r, 0] == text[r, 0, 0]).all()) for r in range(3)]

    assert short_rows(0.0, 0) == [False] * 3
    assert short_rows(0.999, 0) == [True] * 3
    picks = [short_rows(0.5, seed) for seed in range(40)]
    assert picks[:5] == [short_rows(0.5, seed) for seed in range(5)]  # deterministic per seed
    assert 0.3 < sum(map(sum, picks)) / 120 < 0.7


def test_without_a_val_split_the_first_clips_are_held_out(tmp_path):
    root = write_fake_latents(tmp_path / "lat", num_clips=8, num_val=0)
    index = read_index(root)
    train_rows, val_rows, heldout = dit_data.split_clips(index, 3)
    assert heldout and list(val_rows["clip_id"]) == ["clip0000", "clip0001", "clip0002"]
    assert not set(val_rows["clip_id"]) & set(train_rows["clip_id"]) and len(train_rows) == 5
    _, val_rows, heldout = dit_data.split_clips(read_index(root), 8)
    assert not heldout and len(val_rows) == 8  # too few clips to hold any out: scored only


def test_packs_respect_the_budget_mix_images_and_videos_and_resume(latents):
    data, _ = _data(latents)
    lengths = [clip_tokens(z.shape, (1, 2, 2)) for z in data.latents]
    assert sorted(set(lengths)) == [15, 16, 30, 32, 45, 80]
    stream = dit_data.PackStream(lengths, 128, seed=0)
    packs = [stream.next_pack() for _ in range(30)]
    assert all(sum(lengths[i] for i in p) <= 128 for p in packs)
    # greedy fill: the clip that opens the next pack would not have fitted in this one
    flat = [i for p in packs for i in p]
    for p, nxt in zip(packs, packs[1:], strict=False):
        assert sum(lengths[i] for i in p) + lengths[nxt[0]] > 128
    assert flat[:12] and sorted(flat[:12]) == list(range(12))  # epoch 0 = a permutation
    assert any({data.kinds[i] for i in p} == {"image", "video"} for p in packs)
    fill = sum(lengths[i] for i in flat) / (len(packs) * 128)
    assert fill > 0.6
    # resuming at the data position reproduces the rest of the sequence
    again = dit_data.PackStream(lengths, 128, seed=0)
    head = [again.next_pack() for _ in range(10)]
    resumed = dit_data.PackStream(lengths, 128, seed=0, position=again.position)
    assert head == packs[:10] and [resumed.next_pack() for _ in range(20)] == packs[10:]
    # ranks split a step's packs r, r + w, ...; together they cover it once
    shards = [dit_data.rank_packs(40, packs[:4], r, 2) for r in range(2)]
    assert [k for k, _ in shards[0]] == [40, 42] and [k for k, _ in shards[1]] == [41, 43]
    with pytest.raises(ValueError, match="token_budget"):
        dit_data.PackStream(lengths, 64, seed=0)


def test_make_batch_keeps_text_rows_with_their_segments(latents):
    data, _ = _data(latents)
    pack = [1, 4, 0]
    gen = torch.Generator().manual_seed(0)
    batch, text, mask = dit_data.make_batch(data, pack, (1, 2, 2), 256, 0.25, gen)
    assert isinstance(batch, PackedBatch) and batch.num_segments == 3 and batch.keep is not None
    for row, seg in enumerate(batch.indices):
        clip = pack[seg]
        n = data.texts[clip].shape[0]
        assert torch.equal(text[row, :n], data.texts[clip])
        assert torch.equal(mask[row, :n], data.text_masks[clip]) and not mask[row, n:].any()
        assert batch.seqlens[row] == clip_tokens(data.latents[clip].shape, (1, 2, 2), 0.25)


def test_validation_loss_is_deterministic_and_tracks_the_weights(latents):
    cfg = tiny_cfg()
    data, val = _data(latents)
    torch.manual_seed(0)
    model = DiT(worker.model_config(cfg.train_dit, data.channels, data.text_dim))
    flow = FlowMatching(worker.flow_config(cfg.train_dit))
    args = (val, flow, (1, 2, 2), 128, 0)
    first, second = worker.validation_loss(model, *args), worker.validation_loss(model, *args)
    assert first == second and 0.5 < first < 2.0  # zero-init output: E[x0^2] ~ 1, any noise
    with torch.no_grad():
        model.final_layer.linear.weight.normal_(0.0, 0.1)
    moved = worker.validation_loss(model, *args)
    assert moved != first and moved == worker.validation_loss(model, *args)
    assert worker.validation_loss(model, *args[:-1], 1) != moved  # the seed fixes the noise


def test_a_checkpoint_of_another_model_is_refused_with_the_fix(tmp_path):
    cfg = tiny_cfg()
    config = worker.model_config(cfg.train_dit, 4, 16)
    (tmp_path / "step-0000003").mkdir()
    other = {**config.to_dict(), "depth": 3}
    (tmp_path / "step-0000003" / "COMPLETE").write_text(json.dumps({"dit_config": other}))
    with pytest.raises(ValueError, match="Delete"):
        worker._check_checkpoint_matches(tmp_path, config)
    other["depth"] = config.depth
    (tmp_path / "step-0000003" / "COMPLETE").write_text(json.dumps({"dit_config": other}))
    worker._check_checkpoint_matches(tmp_path, config)  # same model: resumes


# --------------------------------------------------------------------------- DeepSpeed runs


def _launch(tmp_path: Path, name: str, cfg, latents: str, procs: int = 1, stop_at=None) -> dict:
    out = tmp_path / name
    out.mkdir(parents=True, exist_ok=True)
    payload = trainer.build_payload(
        cfg, out, tmp_path / f"{name}-ckpt", worker.SUMMARY_NAME, latents=latents, stop_at=stop_at
    )
    launch("components.steps.train_dit.worker:worker", payload, procs, tmp_path / f"{name}.log")
    return json.loads((out / worker.SUMMARY_NAME).read_text())


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    return DiT.from_pretrained(directory).state_dict()


@pytest.mark.slow
class TestTrainDiTStep(StepTesterMixin):
    step = train_dit.STEP
    overrides = (
        *TINY,
        "train_dit.train.steps=40",
        "train_dit.eval_every=20",
        "train_dit.train.checkpoint_every=20",
        "train_dit.train.ema_decay=0.5",
        "train_dit.drop_rate=0.1",
    )
    bad_config = ("train_dit.size=tessera-huge",)
    bad_config_error = "unknown DiT size 'tessera-huge'"

    @pytest.fixture(scope="class")
    def step_inputs(self, latents):
        return {"latents": latents}

    def test_training_learns_and_exports_a_loadable_model(self, step_run, latents):
        out, cfg = step_run.outputs, step_run.cfg
        assert out["steps"] == 40
        assert out["val_loss"] < 0.8 * out["initial_val_loss"]  # it learns (overfit setting)
        assert out["tokens_per_s"] > 0 and 0 < out["mfu"] < 1 and out["train_seconds"] > 0
        # checkpoints (and the log) outside the step's output, keyed by pipeline run and step
        home = Path(os.environ["TESSERA_HOME"])
        assert (
            Path(out["checkpoint_dir"]) == home / "checkpoints" / step_run.ctx.run_id / "train_dit"
        )
        assert (Path(out["checkpoint_dir"]) / "step-0000040" / "COMPLETE").exists()
        assert (Path(out["checkpoint_dir"]) / train_dit.LOG_NAME).is_file()
        step_dir = Path(out["step_uri"])
        summary = json.loads((step_dir / worker.SUMMARY_NAME).read_text())
        assert all(torch.isfinite(torch.tensor(summary["losses"])))
        first, last = summary["losses"][:10], summary["losses"][-10:]
        assert sum(last) / 10 < 0.85 * sum(first) / 10
        # consolidated weights (EMA) + the flow schedule the generator loads
        dit = DiT.from_pretrained(out["dit"])
        assert dit.config.in_channels == 4 and dit.config.text_dim == 16
        flow = FlowConfig.from_json(Path(out["dit"]) / FLOW_CONFIG_NAME)
        assert flow == worker.flow_config(cfg.train_dit)
        val = _data(latents)[1]
        ema = worker.validation_loss(dit, val, FlowMatching(flow), (1, 2, 2), 128, 0)
        assert ema < out["initial_val_loss"]

    def test_rank0_logged_the_curves_into_the_step_run(self, step_run):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        run_id = step_run.outputs["mlflow_run_id"]
        assert [m.step for m in client.get_metric_history(run_id, "loss")] == list(range(2, 41, 2))
        assert [m.step for m in client.get_metric_history(run_id, "val_loss")] == [0, 20, 40]
        logged = client.get_run(run_id).data.metrics
        for key in ("tokens_per_s", "mfu", "lr", "grad_norm", "step_time_s", "train_dit.val_loss"):
            assert key in logged, key
        assert any(k.startswith("loss_t") for k in logged)
        assert worker.SUMMARY_NAME in [a.path for a in client.list_artifacts(run_id)]


EQUIVALENCE = [
    "train_dit.train.steps=6",
    "train_dit.train.checkpoint_every=3",
    "train_dit.drop_rate=0.2",
    "train_dit.train.ema_decay=0.8",
    "train_dit.eval_every=3",
    "train_dit.train.compile='on'",  # as make demo trains: inductor on the blocks (YAML: quoted)
]


# Weights of two compiled runs agree to bf16 rounding, not bit for bit: inductor's reduction
# kernels split their work by thread count (1 per rank vs 2 in one process) and may come from the
# kernel cache of another process, and Adam turns a rounding-level gradient difference on a
# near-zero gradient into up to one step (lr 3e-3). A missed or doubled step moves every weight by
# ~lr, and the losses above are compared to 1e-4 / 1e-5.
COMPILED_WEIGHTS = {"rtol": 1e-3, "atol": 2e-3}


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory, worker_id):
    """The reference: 1 process, grad_accum 2 (2 packs per step). Run once per session, also
    across xdist workers (the recipe from pytest-xdist's docs: a shared directory + a lock)."""
    from filelock import FileLock

    base = tmp_path_factory.getbasetemp()
    shared = (base if worker_id == "master" else base.parent) / "train_dit_reference"
    shared.mkdir(exist_ok=True)
    with FileLock(str(shared / "lock")):
        summary = shared / "one" / worker.SUMMARY_NAME
        if not summary.exists():
            cfg = tiny_cfg(*EQUIVALENCE, "train_dit.train.grad_accum=2")
            _launch(shared, "one", cfg, write_fake_latents(shared / "latents"))
        return json.loads(summary.read_text()), shared / "one" / "dit"


@pytest.mark.slow
def test_two_gloo_processes_match_one_with_the_same_global_batch(
    latents, one_process_run, tmp_path
):
    one, one_dir = one_process_run
    cfg = tiny_cfg(*EQUIVALENCE, "train_dit.train.grad_accum=1", "train_dit.train.num_processes=2")
    two = _launch(tmp_path, "two", cfg, latents, procs=2)
    assert two["packs_per_step"] == one["packs_per_step"] == 2 and two["steps"] == 6
    for run in (one, two):  # compiled, with no region left to eager
        assert run["compile"]["compiled"] and run["compile"]["fallbacks"] == {}, run["compile"]
    assert two["losses"] == pytest.approx(one["losses"], rel=1e-4)
    assert None not in one["grad_norms"]
    assert two["grad_norms"] == pytest.approx(one["grad_norms"], rel=1e-4)
    assert [v for _, v in two["val"]] == pytest.approx([v for _, v in one["val"]], rel=1e-4)
    a, b = _weights(one_dir), _weights(tmp_path / "two" / "dit")
    for key in a:
        torch.testing.assert_close(b[key], a[key], **COMPILED_WEIGHTS, msg=key)


@pytest.mark.slow
def test_samples_at_every_aspect_ratio_go_to_mlflow(tessera_home, tmp_path):
    import mlflow

    from components.core.runner import RunContext, run_step
    from model.vae import build_vae

    build_vae("vae-tiny").save_pretrained(tmp_path / "vae")  # 4 latent channels
    root = write_fake_latents(tmp_path / "lat", num_clips=4, num_val=1, text_dim=384)  # MiniLM
    cfg = tiny_cfg(
        "train_dit.train.steps=2",
        "train_dit.sample_every=1",
        "train_dit.eval_every=0",
        "train_dit.sample_frames=5",
        "train_dit.sample_pixels=1024",
        "train_dit.sample_steps=2",
    )
    ctx = RunContext("run-samples", "test")
    out = run_step(train_dit.STEP, cfg, ctx, latents=root, vae=str(tmp_path / "vae"))
    assert out["samples"] == 2 * 4 * 2  # (step 1, final) x 4 aspects x 2 prompts
    client = mlflow.MlflowClient()
    listed = client.list_artifacts(out["mlflow_run_id"], "samples/final")
    names = [
        f"{a}-{i}.{'png' if a == 'image' else 'mp4'}"
        for a in ("16x9", "9x16", "1x1", "image")
        for i in range(2)
    ]
    assert sorted(Path(f.path).name for f in listed) == sorted(["prompts.json", *names])
    assert client.list_artifacts(out["mlflow_run_id"], "samples/step-0000001")
    from components.core.media import load_video

    video = load_video(Path(out["step_uri"]) / "samples" / "final" / "16x9-0.mp4")
    assert video.shape[1] == 5 and video.shape[3] > video.shape[2]  # 5 frames, landscape
