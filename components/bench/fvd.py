"""FVD feature extraction: clips/s of our I3D path vs cd-fvd's, same weights, same clips.

Ours: :class:`evaluation.fvd.I3DExtractor` on a StyleGAN-V-signature TorchScript file (uint8 clips
into the model, which scales to [-1, 1] and resizes to 224x224 inside). Peer: cd-fvd's I3D path,
``load_i3d_model`` on a state dict of the same weights and ``preprocess_i3d`` (float resize, then
scale) before the eager ``InceptionI3d``, in ``torch.no_grad`` as cd-fvd's ``get_i3d_logits`` runs
it. Both get the same random uint8 clips (default 4 clips of 16x64x64) in one batch. The weights
are random (seeded): speed does not depend on them, and the real ``i3d_torchscript.pt`` is not
downloaded by a benchmark. The two outputs are compared too (``extra``): they must agree to
float32 round-off, or the comparison is not like for like.

The stand-in TorchScript comes from ``tests/testing_utils/i3d.py``, loaded by file path from this
checkout: the ``tests`` package is not importable from the product (torch-fidelity installs a stray
top-level ``tests`` package into site-packages that shadows ours outside pytest), and one builder
for tests and bench keeps them the same network. cd-fvd's I3D modules import no torchvision (only
``cdfvd.fvd`` and its VideoMAE helpers do), so no torchvision placeholder is needed here; without
cd-fvd (the dev extras) the case raises a clear error.
"""

from __future__ import annotations

import importlib.util
import statistics
import sys
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

from components.bench import BenchRecord, benchmark
from components.bench.dit import interleaved_times, load_average, timing_summary
from components.core.config import TesseraConfig

PEER = "cd-fvd I3D (preprocess_i3d + InceptionI3d)"
REPO = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class FVDBenchSizes:
    """Clips of the case: ``clips`` uint8 videos of ``frames`` x ``side`` x ``side``, one batch.

    ``warmup`` calls per side come first: TorchScript's profiling executor specialises the graph
    on its first calls, so timing them would measure compilation.
    """

    clips: int = 4
    frames: int = 16
    side: int = 64
    warmup: int = 2
    max_repeats: int = 2


def _cdfvd_i3d() -> ModuleType:
    try:
        import cdfvd.third_party.i3d.utils as i3d_utils
    except ImportError as err:
        raise RuntimeError(
            "the fvd_features bench case compares against cd-fvd, a dev extra that is not "
            "installed here: run `make setup` (installs '.[dev]')"
        ) from err
    return i3d_utils


def _stand_in() -> ModuleType:
    """``tests/testing_utils/i3d.py`` of this checkout (under pytest: the imported module)."""
    for name in ("tests.testing_utils.i3d", "_tessera_bench_testing_i3d"):
        if name in sys.modules:
            return sys.modules[name]
    path = REPO / "tests" / "testing_utils" / "i3d.py"
    if not path.is_file():
        raise RuntimeError(
            f"the fvd_features bench case builds its I3D stand-in with {path}, which this "
            "installation lacks: run it from a source checkout with the dev extras (make setup)"
        )
    spec = importlib.util.spec_from_file_location("_tessera_bench_testing_i3d", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@benchmark("fvd_features")
def fvd_features(cfg: TesseraConfig, s: FVDBenchSizes = FVDBenchSizes()) -> list[BenchRecord]:
    import numpy as np
    import torch

    from evaluation.fvd import I3DExtractor

    i3d_utils, stand_in = _cdfvd_i3d(), _stand_in()
    with tempfile.TemporaryDirectory(prefix="tessera-bench-fvd-") as tmp:
        script = stand_in.save_i3d_torchscript(
            Path(tmp) / "i3d_torchscript.pt", seed=cfg.seed, num_frames=s.frames
        )
        state = stand_in.save_i3d_state_dict(Path(tmp) / "i3d_pretrained_400.pt", seed=cfg.seed)
        ours = I3DExtractor.from_file(script, num_frames=s.frames, batch_size=s.clips)
        peer = i3d_utils.load_i3d_model(torch.device("cpu"), str(state))
    rng = np.random.default_rng(cfg.seed)
    videos = rng.integers(0, 256, (s.clips, s.frames, s.side, s.side, 3), dtype=np.uint8)

    def run_ours() -> Any:
        return ours.features(list(videos))

    def run_peer() -> Any:
        with torch.no_grad():
            return peer(i3d_utils.preprocess_i3d(videos)).numpy()

    fns = {"ours": run_ours, "peer": run_peer}
    load_before = load_average()
    seconds = interleaved_times(fns, warmup=s.warmup, repeats=min(cfg.bench.repeats, s.max_repeats))
    out_ours, out_peer = run_ours(), run_peer()
    sec = {k: statistics.median(v) for k, v in seconds.items()}
    extra = {
        "sizes": asdict(s),
        "clip_thwc": [s.frames, s.side, s.side, 3],
        "i3d_input": [s.clips, 3, s.frames, 224, 224],
        "feature_dim": int(out_ours.shape[1]),
        "max_abs_feature_diff_rel": float(
            np.abs(out_ours - out_peer).max() / max(np.abs(out_peer).max(), 1e-12)
        ),
        "timing": {k: timing_summary(v) for k, v in seconds.items()},
        "load_average": [load_before, load_average()],
        "torch_threads": torch.get_num_threads(),
        "weights": "random (seeded), the same in both",
    }
    return [
        BenchRecord(
            "fvd_features.i3d.clips_per_s",
            s.clips / sec["ours"],
            "clips/s",
            PEER,
            s.clips / sec["peer"],
            extra=extra,
        )
    ]
