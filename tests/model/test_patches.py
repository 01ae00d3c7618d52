import pytest
import torch

from model.patches import (
    PackedBatch,
    clip_tokens,
    cu_seqlens_from,
    drop_tokens,
    grid_shape,
    pack_grids,
    pack_patches,
    pad_text,
    pad_to_patch,
    patch_coords,
    patchify,
    plan_packs,
    real_token_fraction,
    segment_ids,
    unpack,
    unpack_grids,
    unpack_latents,
    unpatchify,
)

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("shape", "patch"),
    [
        ((3, 5, 6, 10), (1, 2, 2)),
        ((2, 4, 9, 15), (2, 3, 3)),
        ((4, 1, 2, 2), (1, 2, 2)),
        ((1, 3, 7, 5), (1, 1, 1)),
    ],
)
def test_patchify_round_trip_odd_grids(shape, patch):
    latent = torch.randn(shape)
    tokens, coords = patchify(latent, patch)
    grid = grid_shape(shape, patch)
    c, pt, ph, pw = shape[0], *patch
    assert tokens.shape == (grid[0] * grid[1] * grid[2], c * pt * ph * pw)
    assert coords.shape == (tokens.shape[0], 3) and coords.dtype == torch.int64
    assert torch.equal(unpatchify(tokens, grid, patch), latent)


def test_token_matches_its_coordinate():
    latent = torch.randn(2, 4, 6, 8)
    tokens, coords = patchify(latent, (2, 2, 2))
    for i in (0, 5, tokens.shape[0] - 1):
        t, h, w = coords[i].tolist()
        block = latent[:, 2 * t : 2 * t + 2, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2]
        assert torch.equal(tokens[i], block.reshape(-1))


def test_indivisible_latent_is_a_clear_error():
    with pytest.raises(ValueError, match=r"not divisible by patch_size.*w=7 % 2"):
        patchify(torch.randn(4, 1, 6, 7), (1, 2, 2))
    padded, (t, h, w) = pad_to_patch(torch.randn(4, 1, 5, 7), (1, 2, 2))
    assert padded.shape == (4, 1, 6, 8) and (t, h, w) == (1, 5, 7)
    tokens, _ = patchify(padded, (1, 2, 2))
    assert unpatchify(tokens, grid_shape(padded.shape), (1, 2, 2))[:, :t, :h, :w].shape == (
        4,
        1,
        5,
        7,
    )


def test_plan_packs_first_fit_decreasing():
    lengths = [5, 3, 8, 2, 7, 1]
    packs = plan_packs(lengths, 10)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 10 for p in packs)
    assert packs == [[2, 3], [4, 1], [0, 5]]  # 8+2, 7+3, 5+1
    with pytest.raises(ValueError, match="exceed token_budget=10"):
        plan_packs([11, 2], 10)


def test_pack_images_and_videos_within_budget():
    gen = torch.Generator().manual_seed(0)
    shapes = [(4, 1, 8, 8), (4, 3, 4, 8), (4, 1, 6, 4), (4, 5, 4, 4), (4, 1, 4, 12), (4, 2, 8, 4)]
    items = [torch.randn(s, generator=gen) for s in shapes]
    budget = 40
    batches = pack_patches(items, budget, (1, 2, 2))
    assert sorted(i for b in batches for i in b.indices) == list(range(len(items)))
    mixed = False
    for b in batches:
        assert isinstance(b, PackedBatch)
        assert b.num_tokens <= budget
        assert b.cu_seqlens[0] == 0 and b.cu_seqlens[-1] == b.num_tokens
        assert torch.bincount(b.seg_ids, minlength=b.num_segments).tolist() == b.seqlens
        mixed |= len({g[0] == 1 for g in b.grids}) == 2
        for seg, idx in zip(unpack(b), b.indices, strict=True):
            assert torch.equal(seg, patchify(items[idx])[0])
        for lat, idx in zip(unpack_latents(b), b.indices, strict=True):
            assert torch.equal(lat, items[idx])
        for seg, grid in zip(unpack(b, b.coords), b.grids, strict=True):
            assert torch.equal(seg, patch_coords(grid))  # coordinates restart in every clip
    assert mixed, "expected at least one pack holding an image and a video"


def test_real_token_fraction():
    items = [
        torch.randn(2, 1, 4, 4),
        torch.randn(2, 2, 4, 4),
        torch.randn(2, 1, 2, 6),
    ]  # 4, 8, 3 tokens
    batches = pack_patches(items, 10)
    assert [b.num_tokens for b in batches] == [8, 7]
    assert real_token_fraction(batches, 10) == pytest.approx(15 / 20)
    assert real_token_fraction([[8], [4, 3]], 10) == pytest.approx(15 / 20)
    assert real_token_fraction([], 10) == 0.0


def test_token_dropping_keeps_true_coordinates():
    items = [torch.randn(3, 2, 8, 8), torch.randn(3, 1, 4, 6)]
    gen = torch.Generator().manual_seed(1)
    (batch,) = pack_patches(items, 1000, drop_rate=0.5, generator=gen)
    assert batch.keep is not None
    for b, idx in enumerate(batch.indices):
        full_tokens, full_coords = patchify(items[idx])
        keep = batch.keep[b]
        assert keep.sum() == round(0.5 * full_tokens.shape[0])
        assert torch.equal(unpack(batch)[b], full_tokens[keep])
        assert torch.equal(unpack(batch, batch.coords)[b], full_coords[keep])
        restored = patchify(unpack_latents(batch)[b])[0]
        assert torch.equal(restored[keep], full_tokens[keep])
        assert restored[~keep].abs().sum() == 0  # dropped tokens come back as zeros
    again = pack_patches(items, 1000, drop_rate=0.5, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(again.tokens, batch.tokens)
    assert drop_tokens(10, 0.99).sum() == 1  # never drops a whole clip
    with pytest.raises(ValueError, match="drop_rate"):
        drop_tokens(10, 1.0)


def test_packed_sequence_helpers_agree_with_each_other():
    grids = [(1, 2, 3), (2, 2, 2), (1, 1, 4)]
    coords, cu = pack_grids(grids)
    assert cu.tolist() == [0, 6, 14, 18] and torch.equal(cu, cu_seqlens_from([6, 8, 4]))
    assert segment_ids(cu).tolist() == [0] * 6 + [1] * 8 + [2] * 4
    assert torch.equal(coords[6:14], patch_coords((2, 2, 2)))
    latents = [torch.randn(3, 2 * g[0], 2 * g[1], 2 * g[2]) for g in grids]
    tokens = torch.cat([patchify(z, (2, 2, 2))[0] for z in latents])
    for back, z in zip(unpack_grids(tokens, grids, (2, 2, 2)), latents, strict=True):
        assert torch.equal(back, z)
    assert (
        clip_tokens((3, 4, 4, 6), (2, 2, 2)) == 12
        and clip_tokens((3, 4, 4, 6), (2, 2, 2), 0.5) == 6
    )


def test_pad_text_keeps_each_row_and_masks_the_padding():
    rows = [torch.ones(2, 5), torch.full((4, 5), 2.0)]
    masks = [torch.tensor([True, True]), torch.tensor([True, True, True, False])]
    text, mask = pad_text(rows, masks)
    assert text.shape == (2, 4, 5) and mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 0]]
    assert torch.equal(text[0, :2], rows[0]) and not text[0, 2:].any()
    assert torch.equal(text[1], rows[1])
