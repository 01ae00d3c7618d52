"""Encode step on the tiny validated corpus: native-aspect latents, images as one latent frame,
text for captioned clips, per-shard idempotent steps, and the index the DiT trainer reads."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from components.core import manifest as mf
from components.core import runner
from components.core.config import load_config
from components.core.latents import read_index
from components.core.manifest import read_clips
from components.core.runner import RunContext
from components.steps import encode, validate
from model.vae import build_vae
from tests.testing_utils.data import make_corpus
from tests.testing_utils.step_tester import StepTesterMixin

torch.set_num_threads(1)

SHIFT, SCALE = 0.25, 3.0


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, str]:
    """The validated tiny manifest and an (untrained) VAE with known latent statistics."""
    root = tmp_path_factory.mktemp("encode")
    manifest = make_corpus(root)
    checked = root / "validate"
    checked.mkdir()
    validate.run(
        load_config("tiny"), checked, manifest, str(Path(manifest).with_name("quarantine.parquet"))
    )
    torch.manual_seed(0)
    vae = build_vae("vae-tiny")
    vae.set_latent_stats(SHIFT, SCALE)
    vae.save_pretrained(root / "vae")
    return {"manifest": str(checked / "manifest.parquet"), "vae": str(root / "vae")}


def _tensors(latents: Path, shard: str) -> dict[str, torch.Tensor]:
    return load_file(str(latents / shard))


def _row(index, name: str):
    return index[index["uri"].str.contains(name)].iloc[0]


def test_recaptioned_captions_replace_all_but_a_share_of_the_originals(corpus, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = mf.read_table(corpus["manifest"]).to_pylist()
    table = pa.Table.from_pylist(
        [
            {
                "clip_id": r["clip_id"],
                "caption": f"recaptioned {i}",
                "short_caption": f"short {i}",
                "caption_source": "recaptioned",
                "captioner_version": "captioner-tiny@abc",
            }
            for i, r in enumerate(rows)
        ]
    )
    pq.write_table(table, tmp_path / "captions.parquet")
    found = encode._captions(corpus["manifest"], str(tmp_path / "captions.parquet"), 0.0)
    for r in rows:
        mine = found[r["clip_id"]]
        assert mine["caption_source"] == "recaptioned" and mine["caption"].startswith("recap")
        assert mine["original_caption"] == r["caption"]  # kept beside it
        assert mine["short_caption"] == (r["short_caption"] or mine["short_caption"])
    kept = encode._captions(corpus["manifest"], str(tmp_path / "captions.parquet"), 1.0)
    for r in rows:  # share 1: every clip that has a caption keeps it; the rest are recaptioned
        expected = r["caption"] if r["caption"] else kept[r["clip_id"]]["caption"]
        assert kept[r["clip_id"]]["caption"] == expected
        assert (kept[r["clip_id"]]["caption_source"] == "recaptioned") == (not r["caption"])
    draws = [encode.keeps_original(f"clip-{i}", 0.05, seed=0) for i in range(4000)]
    assert 0.04 < sum(draws) / len(draws) < 0.06  # the blend's share, deterministic per clip
    assert draws == [encode.keeps_original(f"clip-{i}", 0.05, seed=0) for i in range(4000)]


class TestEncodeStep(StepTesterMixin):
    step = encode.STEP
    bad_config = ("encode.shard_size=0",)
    bad_config_error = "encode.shard_size must be >= 1"

    @pytest.fixture(scope="class")
    def step_inputs(self, corpus):
        return {"manifest": corpus["manifest"], "vae": corpus["vae"]}

    @pytest.fixture(scope="class")
    def encoded(self, step_run) -> dict:
        latents = step_run.outputs["latents"]
        return {"dir": Path(latents), "index": read_index(latents), "outputs": step_run.outputs}

    def test_every_validated_clip_has_a_row_and_a_latent_of_its_shape(self, corpus, encoded):
        index, latents = encoded["index"], encoded["dir"]
        validated = mf.read_table(corpus["manifest"]).column("clip_id").to_pylist()
        assert sorted(index["clip_id"]) == sorted(validated)
        assert list(index.columns[:15]) == [
            "clip_id",
            "shard",
            "split",
            "kind",
            "caption",
            "short_caption",
            "caption_source",
            "width",
            "height",
            "num_frames",
            "latent_c",
            "latent_t",
            "latent_h",
            "latent_w",
            "uri",
        ]
        assert index["shard"].nunique() == -(-len(index) // 4)  # tiny: 4 clips a shard
        for shard, rows in index.groupby("shard"):
            tensors = _tensors(latents, shard)
            for row in rows.itertuples():
                z = tensors[f"{row.clip_id}/latent"]
                assert z.dtype == torch.float32
                assert z.shape == (row.latent_c, row.latent_t, row.latent_h, row.latent_w)
                assert (row.height, row.width) == (8 * row.latent_h, 8 * row.latent_w)
                assert row.latent_h % 2 == 0 and row.latent_w % 2 == 0  # whole 1x2x2 patches
                assert row.num_frames == 1 + 4 * (row.latent_t - 1) <= 9
                assert row.width * row.height <= 4096  # tiny: encode.max_pixels

    def test_aspect_ratio_is_kept_and_images_are_one_latent_frame(self, encoded):
        index = encoded["index"]
        wide, tall = _row(index, "synthetic_0004"), _row(index, "synthetic_0005")  # 64x36, 36x64
        assert (wide.source_width, wide.source_height) == (64, 36)
        assert (wide.latent_h, wide.latent_w) == (tall.latent_w, tall.latent_h)
        assert abs(wide.latent_w - wide.latent_h * 16 / 9) <= 1  # 16:9 within a latent pixel
        carphone = _row(index, "real_carphone")  # 96x78: downscaled to <= 4096 pixels, aspect kept
        assert carphone.width < 96 and abs(carphone.width / carphone.height - 96 / 78) < 0.2
        images = index[index["kind"] == "image"]
        assert (
            len(images) == 2
            and (images["latent_t"] == 1).all()
            and (images["num_frames"] == 1).all()
        )
        assert (index[index["kind"] == "video"]["latent_t"] > 1).all()

    def test_latents_are_the_normalised_posterior_mode(self, corpus, encoded):
        from components.core.artifacts import load_vae

        cfg = load_config("tiny")
        encoder = encode.ClipEncoder(cfg, load_vae(corpus["vae"]))
        row = _row(encoded["index"], "synthetic_0000")
        clip = next(c for c in read_clips(corpus["manifest"]) if c.clip_id == row.clip_id)
        video = encoder.pixels(clip)
        with torch.no_grad():
            posterior, _ = encoder.vae.encode_video(video[None])
        stored = _tensors(encoded["dir"], row.shard)[f"{row.clip_id}/latent"]
        torch.testing.assert_close(
            stored, (posterior.mode()[0] - SHIFT) * SCALE, atol=1e-4, rtol=1e-4
        )

    def test_captioned_clips_carry_text_embeddings(self, encoded):
        index, latents = encoded["index"], encoded["dir"]
        captioned = index["caption"].notna() & (index["caption"] != "")
        assert captioned.any() and (~captioned).any()
        assert (index["has_text"] == captioned).all()
        for row in index.itertuples():
            tensors = _tensors(latents, row.shard)
            if row.has_text:
                text, mask = tensors[f"{row.clip_id}/text"], tensors[f"{row.clip_id}/text_mask"]
                # real tokens only (train_dit pads per batch), at most text.max_length
                assert text.dtype == torch.float32 and text.shape[1] == 384  # minilm
                assert 3 <= text.shape[0] <= load_config("tiny").text.max_length
                assert mask.dtype == torch.uint8 and mask.shape == (text.shape[0],) and mask.all()
                short = tensors.get(f"{row.clip_id}/short_text")
                assert (short is not None) == bool(row.short_caption)
                if short is not None:  # the short caption's own, shorter embedding
                    assert short.shape[1] == 384 and 3 <= short.shape[0] < text.shape[0]
                    assert tensors[f"{row.clip_id}/short_text_mask"].shape == (short.shape[0],)
            else:
                assert f"{row.clip_id}/text" not in tensors
                assert f"{row.clip_id}/short_text" not in tensors

    def test_shards_are_committed_parts_and_merge_like_the_step(
        self, corpus, encoded, tessera_home, monkeypatch
    ):
        cfg = load_config("tiny")
        ctx = RunContext("encode-test", "test", track=False)
        inputs = {"manifest": corpus["manifest"], "vae": corpus["vae"]}
        shards = runner.plan_parts(encode.STEP, cfg, **inputs)
        assert [s["index"] for s in shards] == list(range(len(shards))) and len(shards) == 3
        outputs = [runner.run_part(encode.STEP, cfg, ctx, s, **inputs) for s in shards]
        assert outputs[2]["step_uri"].endswith("/encode-parts/00002")
        assert outputs[0]["metrics"]["clips"] == 4.0  # reported by the step's run, by index

        def boom(*args, **kwargs):
            raise AssertionError("a committed shard was encoded again")

        spec = dataclasses.replace(encode.STEP, part=boom)
        assert [runner.run_part(spec, cfg, ctx, s, **inputs) for s in shards] == outputs

        merged = runner.run_step(encode.STEP, cfg, ctx, parts=outputs)
        index = read_index(merged["latents"])
        reference = encoded["index"]
        assert list(index["clip_id"]) == list(reference["clip_id"])
        assert list(index["shard"]) == list(reference["shard"])
        for row in index.itertuples():
            mine = _tensors(Path(merged["latents"]), row.shard)[f"{row.clip_id}/latent"]
            ref = _tensors(encoded["dir"], row.shard)[f"{row.clip_id}/latent"]
            torch.testing.assert_close(mine, ref)

    def test_the_step_run_reports_every_shard(self, encoded):
        import mlflow

        from components.core import tracking

        client = mlflow.MlflowClient(tracking_uri=tracking.tracking_uri())
        clips = client.get_metric_history(encoded["outputs"]["mlflow_run_id"], "part/clips")
        assert sorted(m.step for m in clips) == [0, 1, 2]
        assert sum(m.value for m in clips) == len(encoded["index"])

    def test_the_dit_trainer_reads_the_output(self, encoded):
        from components.steps.train_dit.data import load_latents

        data = load_latents(str(encoded["dir"]), encoded["index"])
        assert len(data.latents) == len(encoded["index"]) and data.text_dim == 384
