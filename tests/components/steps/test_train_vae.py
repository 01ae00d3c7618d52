"""VAE training step: crops, losses, and real DeepSpeed runs on the tiny corpus (overfit,
resume, two gloo processes, MLflow artifacts, latent statistics in the saved config)."""

from __future__ import annotations

import json
from pathlib import Path

import av
import pytest
import torch

from components.core import trainer
from components.core.config import ConfigError, load_config
from components.core.manifest import read_clips
from components.core.trainer import ResumableSampler, launch
from components.steps import train_vae
from components.steps.train_vae import data as vae_data
from components.steps.train_vae import losses, worker
from model.vae import CausalVAE
from tests.testing_utils.data import make_corpus, subset
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)

# Small and fast: 5 x 32 x 32 crops, a base-8 VAE, checkpoints and logs every few steps.
TINY = [
    "train_vae.size=vae-tiny",
    "train_vae.crop_frames=5",
    "train_vae.crop_size=[32, 32]",
    "train_vae.stats_samples=4",
    "train_vae.val_clips=1",
    "train_vae.train.warmup_steps=0",
    "train_vae.train.schedule=constant",
]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> str:
    return make_corpus(tmp_path_factory.mktemp("corpus"))


def _launch(cfg, manifest: str, out: Path, **payload) -> dict:
    body = trainer.build_payload(cfg, out, out / "ckpt", worker.RESULT_NAME, manifest=manifest)
    launch(
        "components.steps.train_vae.worker:worker",
        {**body, **payload},
        cfg.train_vae.train.num_processes,
        out / "train.log",
    )
    result = out / worker.RESULT_NAME
    return {
        "history": json.loads((out / worker.HISTORY_NAME).read_text()),
        "result": json.loads(result.read_text()) if result.exists() else None,
    }


# --------------------------------------------------------------------------- pieces


def test_crops_keep_native_pixels_pad_small_clips_and_repeat_by_position(manifest):
    clips = {c.name: c for c in read_clips(manifest)}
    wide, image = clips["synthetic_0000"], clips["image_0001"]  # 56x42 x 9 frames, 36x64 still
    data = vae_data.CropDataset([wide, image], crop_frames=5, crop_size=(48, 48), seed=0)
    video = data.crop(position=7, index=0)
    assert video["video"].shape == (3, 5, 48, 48)
    assert video["valid"].tolist() == [5, 42, 48]  # height 42 < 48: cropped to what is there
    assert video["video"].min() >= -1 and video["video"].max() <= 1
    assert torch.equal(video["video"][:, :, 42:], video["video"][:, :, 41:42].expand(-1, -1, 6, -1))
    still = data.crop(position=8, index=1)
    assert still["valid"].tolist() == [1, 48, 36]  # one frame, 36 wide
    assert torch.equal(still["video"][:, 1:], still["video"][:, :1].expand(-1, 4, -1, -1))
    again = vae_data.CropDataset([wide, image], 5, (48, 48), seed=0, cache_mb=8)
    assert torch.equal(again.crop(7, 0)["video"], video["video"])  # cached or not, same crop
    crops = [data.crop(p, 0)["video"] for p in range(4)]
    assert not all(torch.equal(crops[0], c) for c in crops[1:])  # positions draw other crops


def test_sampler_positions_follow_the_resumable_stream():
    base = ResumableSampler(5, seed=1, rank=1, world_size=2, start=6)
    pairs = [p for _, p in zip(range(4), trainer.PositionedSampler(base), strict=False)]
    full = [i for _, i in zip(range(16), ResumableSampler(5, seed=1), strict=False)]
    assert [pos for pos, _ in pairs] == [7, 9, 11, 13]
    assert [idx for _, idx in pairs] == [full[7], full[9], full[11], full[13]]


def test_holdout_clips_are_never_trained_on(manifest):
    cfg = load_config("tiny")
    picked = vae_data.select_clips(read_clips(manifest), cfg.train_vae)
    assert sorted(c.name for c in picked["holdout"]) == ["real_bikes", "real_carphone"]
    assert not {c.name for c in picked["train"]} & {"real_bikes", "real_carphone"}
    assert {c.kind for c in picked["train"]} == {"video", "image"}
    assert picked["val_source"] == "train"  # the tiny corpus has no val split


def test_video_share_repeats_videos_in_an_image_rich_corpus(manifest):
    train = vae_data.select_clips(read_clips(manifest), load_config("tiny").train_vae)["train"]
    assert trainer.balance_kinds(train, 0.0, lambda c: c.kind) == train
    for share in (0.5, 0.8, 0.95):
        balanced = trainer.balance_kinds(train, share, lambda c: c.kind)
        videos = [c for c in balanced if c.kind == "video"]
        assert len(videos) / len(balanced) >= share
        assert {c.uri for c in balanced} == {c.uri for c in train}  # nothing dropped
        assert [c for c in balanced if c.kind == "image"] == [c for c in train if c.kind == "image"]
    with pytest.raises(ValueError, match="video_share must be in"):
        load_config("tiny", ["train_vae.video_share=1.0"])


def test_discriminator_takes_images_and_videos():
    disc = losses.PatchDiscriminator3D(channels=8)
    assert disc(torch.zeros(2, 3, 5, 32, 48)).shape == (2, 1, 5, 4, 6)
    assert disc(torch.zeros(1, 3, 1, 32, 32)).shape == (1, 1, 1, 4, 4)


def test_lpips_is_optional_and_a_missing_file_is_a_clear_error(tmp_path):
    cfg = load_config("tiny", ["train_vae.lpips_weights=/nowhere/lpips.pt"])
    with pytest.raises(FileNotFoundError, match="lpips_weights='/nowhere/lpips.pt' does not exist"):
        train_vae.check(cfg)

    class Distance(torch.nn.Module):  # stands in for a traced LPIPS network
        def forward(self, x, y):
            return (x - y).pow(2).mean(dim=(1, 2, 3))

    path = tmp_path / "lpips.pt"
    torch.jit.script(Distance()).save(str(path))
    perceptual = losses.load_lpips(str(path))
    x = torch.zeros(2, 3, 5, 8, 8)
    valid = torch.tensor([[5, 8, 8], [1, 4, 4]])
    terms = losses.reconstruction_losses(x, x + 0.5, valid, perceptual)
    assert terms["lpips"].item() == pytest.approx(0.25)
    assert "lpips" not in losses.reconstruction_losses(x, x, valid)


def test_config_errors_name_the_setting():
    with pytest.raises(ConfigError, match="crop_frames=8 must be 1 \\+ 4k"):
        load_config("tiny", ["train_vae.crop_frames=8"])
    with pytest.raises(ConfigError, match=r"deepspeed=zero3 \(ZeRO stage 3\) is not supported"):
        load_config("tiny", ["train_vae.train.deepspeed=zero3"])
    with pytest.raises(ValueError, match="unknown VAE size 'vae-huge'; choose one of"):
        train_vae.check(load_config("tiny", ["train_vae.size=vae-huge"]))


# --------------------------------------------------------------------------- real runs


@pytest.mark.slow
class TestTrainVAEStep(StepTesterMixin):
    """One video + one image, 80 steps: the loss falls by more than 40% (measured: ~60%)."""

    step = train_vae.STEP
    overrides = (
        *TINY,
        "train_vae.latent_channels=16",
        "train_vae.train.steps=80",
        "train_vae.train.lr=0.003",
        "train_vae.train.log_every=10",
        "train_vae.eval_every=40",
        "train_vae.train.checkpoint_every=40",
    )
    bad_config = ("train_vae.size=vae-huge",)
    bad_config_error = "unknown VAE size 'vae-huge'"

    @pytest.fixture(scope="class")
    def step_inputs(self, manifest, tmp_path_factory):
        names = ["synthetic_0000", "image_0000", "real_carphone", "real_bikes"]
        return {"manifest": subset(manifest, names, tmp_path_factory.mktemp("few") / "few.parquet")}

    def test_overfits_few_clips(self, step_run):
        out = step_run.outputs
        assert out["steps"] == 80 and out["final_loss"] < 0.6 * out["initial_loss"], out
        assert set(out["holdout"]) == {"real_bikes", "real_carphone"}
        assert out["holdout_psnr"] > 10 and 0 < out["holdout_ssim"] < 1
        vae = CausalVAE.from_pretrained(out["vae"])  # latent statistics are in the saved config
        assert vae.config.scaling_factor == pytest.approx(out["latent_scale"])
        assert vae.config.shift_factor == pytest.approx(out["latent_shift"])
        assert vae.config.scaling_factor != 1.0 and vae.config.latent_channels == 16

    def test_logs_losses_and_reconstructions(self, step_run, tmp_path):
        import mlflow

        from components.core import tracking

        out = step_run.outputs
        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        losses = client.get_metric_history(out["mlflow_run_id"], "train/loss")
        assert [m.step for m in losses] == list(range(10, 81, 10))
        assert client.get_metric_history(out["mlflow_run_id"], "val_psnr")
        artifacts = {
            Path(a.path).name
            for a in client.list_artifacts(out["mlflow_run_id"], "reconstructions")
        }
        assert {"holdout_real_bikes.mp4", "holdout_real_carphone.mp4"} <= artifacts
        local = client.download_artifacts(
            out["mlflow_run_id"], "reconstructions/holdout_real_bikes.mp4", str(tmp_path)
        )
        with av.open(local) as box:  # original | reconstruction | error, at the encode size
            frame = next(box.decode(video=0))
        held = out["holdout"]["real_bikes"]
        assert (frame.width, frame.height) == (3 * held["width"], held["height"])

    def test_the_log_is_kept_beside_the_checkpoints_and_in_the_outputs(self, step_run):
        from components.core.runner import checkpoint_dir

        log = checkpoint_dir(step_run.ctx, "train_vae") / worker.LOG_NAME
        assert "train_vae: step 80/80" in log.read_text()
        assert (Path(step_run.outputs["step_uri"]) / worker.LOG_NAME).read_text() == log.read_text()


@pytest.mark.slow
def test_resume_continues_steps_data_and_discriminator(manifest, tmp_path):
    cfg = load_config(
        "tiny",
        [
            *TINY,
            "train_vae.train.steps=6",
            "train_vae.train.log_every=2",
            "train_vae.train.checkpoint_every=4",
            "train_vae.disc_weight=0.1",
            "train_vae.disc_start=1",
            "train_vae.disc_channels=8",
        ],
    )
    first = _launch(cfg, manifest, tmp_path, stop_at=3)  # pre-empted after step 3
    assert [h["step"] for h in first["history"]] == [1, 2, 3] and first["result"] is None
    assert (tmp_path / "ckpt" / "step-0000003" / worker.DISC_WEIGHTS).exists()
    second = _launch(cfg, manifest, tmp_path)  # the retry resumes at step 4
    assert [h["step"] for h in second["history"]] == [4, 5, 6]
    batch = cfg.train_vae.train.micro_batch
    positions = [p for h in first["history"] + second["history"] for p in h["positions"]]
    assert positions == list(range(6 * batch))  # the data stream continues where it stopped
    assert all("d_loss" in h for h in second["history"])  # the discriminator came back
    result = second["result"]
    assert result["steps"] == 6
    assert result["initial_loss"] == pytest.approx(
        sum(h["loss"] for h in first["history"][:2]) / 2
    )  # restored from the checkpoint
    saved = json.loads((tmp_path / "vae" / "config.json").read_text())
    assert saved["scaling_factor"] == pytest.approx(result["latent_scale"]) != 1.0
    assert (tmp_path / "reconstructions" / "holdout_real_carphone.mp4").stat().st_size > 0


@pytest.mark.slow
def test_two_gloo_processes_split_the_data_stream(manifest, tmp_path):
    cfg = load_config(
        "tiny",
        [
            *TINY,
            "train_vae.train.steps=3",
            "train_vae.train.micro_batch=1",
            "train_vae.train.num_processes=2",
            "train_vae.train.log_every=1",
            "train_vae.train.checkpoint_every=3",
        ],
    )
    run = _launch(cfg, manifest, tmp_path)
    assert run["result"]["steps"] == 3
    assert [h["positions"] for h in run["history"]] == [[0], [2], [4]]  # rank 0's share
    assert (tmp_path / "ckpt" / "step-0000003" / "rng_rank1.pt").exists()
    assert CausalVAE.from_pretrained(tmp_path / "vae").config.scaling_factor != 1.0
