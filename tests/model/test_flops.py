"""Parameter and FLOP counts from the config alone, against the model they describe."""

import pytest

from model.dit import DIT_SIZES, DiT, dit_config
from model.flops import count_params, flops_per_token, forward_flops, train_flops
from tests.testing_utils.models import tiny_dit_config as tiny_config


@pytest.mark.parametrize(("qk_norm", "pooled_text"), [(True, True), (False, False)])
def test_count_params_matches_model(qk_norm, pooled_text):
    cfg = tiny_config(qk_norm=qk_norm, out_channels=8, mlp_ratio=3.0, pooled_text=pooled_text)
    assert count_params(cfg) == sum(p.numel() for p in DiT(cfg).parameters())


def test_size_registry_and_flops():
    sizes = [count_params(dit_config(name)) for name in DIT_SIZES]
    assert list(DIT_SIZES) == [
        "tessera-tiny",
        "tessera-xs",
        "tessera-s",
        "tessera-m",
        "tessera-l",
        "tessera-xl",
    ]
    assert sizes == sorted(sizes) and sizes[0] < 1e5 < 5e6 < sizes[1] and sizes[-1] < 1.5e9
    cfg = dit_config("tessera-s", in_channels=8, patch_size=(1, 2, 2))
    assert cfg.in_dim == 32 and cfg.rope_dims == (24, 20, 20)
    assert forward_flops(cfg, [256, 256], 20) == 2 * forward_flops(cfg, [256], 20)
    assert forward_flops(cfg, [512], 20) > 2 * forward_flops(
        cfg, [256], 20
    )  # attention is quadratic
    assert flops_per_token(cfg, 1024) > flops_per_token(cfg, 256)
    # dense matmuls dominate short clips: 6 FLOPs per trained token per per-token weight
    # (qkv 3D², proj D², cross q + out 2D², MLP 8D² = 14D² per block)
    ratio = train_flops(cfg, [64]) / (6 * 64 * cfg.depth * 14 * cfg.hidden_size**2)
    assert 1.0 < ratio < 1.1
