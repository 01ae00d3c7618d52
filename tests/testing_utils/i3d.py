"""Stand-ins for StyleGAN-V's ``i3d_torchscript.pt``, written as real TorchScript files.

- :func:`save_i3d_torchscript`: cd-fvd's I3D network (``InceptionI3d(400)``, the pytorch-i3d port)
  with seeded random weights, traced, inside a scripted wrapper with the StyleGAN-V call signature
  ``model(x_uint8 (B, 3, T, H, W), rescale, resize, return_features)``: uint8 -> [-1, 1], frames
  resized to 224x224, the 400 pre-softmax outputs (softmax probabilities without
  ``return_features``). :func:`save_i3d_state_dict` writes the same weights for cd-fvd's own
  ``load_i3d_model(device, ckpt_path)``, so both paths run one network. Full size: ~12.7 M
  parameters, a ~50 MB file, about 1 s per 16-frame clip on one CPU thread.
- :func:`save_tiny_i3d_torchscript`: a two-convolution scripted network with the same call
  signature, milliseconds a clip: for tests that only need the loading and metric plumbing (an
  evaluate step), not I3D's numbers. The full I3D is too slow for step tests (~1 s a clip).

cd-fvd's I3D module imports without torchvision (only ``cdfvd.fvd`` and the VideoMAE-v2 helpers
need it), so this module needs no placeholder; it imports torch and cd-fvd only, so the bench
case can load it by file path (``components/bench/fvd.py``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

I3D_SIZE = 224  # the resolution I3D sees after the model's resize


def build_i3d(seed: int = 0) -> nn.Module:
    """cd-fvd's ``InceptionI3d(400, in_channels=3)`` with seeded random weights, eval mode.

    Convolutions get Kaiming-normal weights (fan-in, ReLU gain) so activations keep their scale
    through the ~60 layers: with PyTorch's default init the outputs of different clips differ by
    ~1e-8, and FVD would compare round-off. The global RNG is left untouched.
    """
    from cdfvd.third_party.i3d.pytorch_i3d import InceptionI3d

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = InceptionI3d(400, in_channels=3)
        for module in net.modules():
            if isinstance(module, nn.Conv3d):
                nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    return net.eval()


def save_i3d_state_dict(path: str | Path, seed: int = 0) -> Path:
    """:func:`build_i3d`'s weights as a state dict (what cd-fvd's ``load_i3d_model`` loads)."""
    path = Path(path)
    torch.save(build_i3d(seed).state_dict(), path)
    return path


class StyleGANVI3D(nn.Module):
    """The StyleGAN-V call signature around a traced I3D (traced at ``num_frames`` frames, 224x224:
    its "same" paddings are baked in, so other sizes are refused instead of computed wrongly)."""

    def __init__(self, network: nn.Module, num_frames: int):
        super().__init__()
        self.network = network
        self.num_frames = num_frames

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        if rescale:  # uint8 [0, 255] -> [-1, 1]
            x = x.to(torch.float32) * (2.0 / 255.0) - 1.0
        if resize:  # every frame to 224x224 (trilinear with T unchanged = bilinear per frame)
            x = F.interpolate(x, size=(x.shape[2], 224, 224), mode="trilinear", align_corners=False)
        if x.shape[2] != self.num_frames or x.shape[3] != 224 or x.shape[4] != 224:
            raise RuntimeError(
                "this I3D stand-in was traced for (B, 3, "
                + str(self.num_frames)
                + ", 224, 224) inputs, got "
                + str(x.shape)
            )
        logits = self.network(x)
        return logits if return_features else torch.softmax(logits, dim=1)


def script_i3d(network: nn.Module, num_frames: int = 16) -> torch.jit.ScriptModule:
    """Trace ``network`` at (1, 3, num_frames, 224, 224) and script the StyleGAN-V wrapper."""
    example = torch.zeros(1, 3, num_frames, I3D_SIZE, I3D_SIZE)
    with warnings.catch_warnings():  # the "same" padding arithmetic becomes constants: intended
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        traced = torch.jit.trace(network, example, check_trace=False)
    return torch.jit.script(StyleGANVI3D(traced, num_frames))


def save_i3d_torchscript(path: str | Path, seed: int = 0, num_frames: int = 16) -> Path:
    """Write ``i3d_torchscript.pt``: :func:`build_i3d`'s network with the StyleGAN-V signature."""
    path = Path(path)
    torch.jit.save(script_i3d(build_i3d(seed), num_frames), str(path))
    return path


class TinyVideoFeatures(nn.Module):
    """A two-convolution video network with the StyleGAN-V I3D call signature (not I3D)."""

    def __init__(self, dim: int = 32, size: int = 32):
        super().__init__()
        self.size = size
        self.conv1 = nn.Conv3d(3, 16, kernel_size=(3, 4, 4), stride=(1, 4, 4))
        self.conv2 = nn.Conv3d(16, 32, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(32, dim)

    def forward(
        self,
        x: torch.Tensor,
        rescale: bool = False,
        resize: bool = False,
        return_features: bool = False,
    ) -> torch.Tensor:
        if rescale:
            x = x.to(torch.float32) * (2.0 / 255.0) - 1.0
        if resize:
            x = F.interpolate(
                x, size=(x.shape[2], self.size, self.size), mode="trilinear", align_corners=False
            )
        h = F.relu(self.conv2(F.relu(self.conv1(x))))
        logits = self.head(h.mean(dim=(2, 3, 4)))
        return logits if return_features else torch.softmax(logits, dim=1)


def save_tiny_i3d_torchscript(path: str | Path, seed: int = 0, dim: int = 32) -> Path:
    """Write a scripted :class:`TinyVideoFeatures` (``dim``-d features, any clip of >= 3 frames):
    loads through ``I3DExtractor.from_file`` like the real file, in milliseconds."""
    path = Path(path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        module = TinyVideoFeatures(dim).eval()
    torch.jit.save(torch.jit.script(module), str(path))
    return path
