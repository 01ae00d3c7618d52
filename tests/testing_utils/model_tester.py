"""The checks every model family passes, as in diffusers' ``ModelTesterMixin``.

A test class sets ``model_class`` and defines ``init_config()`` (a tiny config) and
``inputs(seed=0)`` (forward arguments); :meth:`output` says which tensor the model produces and
:meth:`training_loss` what a training step differentiates, where the defaults do not fit.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch

from model.config import CONFIG_NAME, WEIGHTS_NAME
from tests.testing_utils.models import scramble


class ModelTesterMixin:
    model_class: ClassVar[type]
    zero_init_output: ClassVar[bool] = False  # the model promises exactly zero output at init
    scramble_weights: ClassVar[bool] = (
        False  # test scrambled weights (a zero-init model's are dead)
    )
    bf16_tolerance: ClassVar[float] = 0.05  # max |bf16 - fp32| / max |fp32| under CPU autocast

    def output(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        return model(**inputs)

    def training_loss(self, model: torch.nn.Module, inputs: dict[str, Any]) -> torch.Tensor:
        out = self.output(model, inputs)
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
        return (out.float() * weights).sum()

    def build(self, seed: int = 0, at_init: bool = False) -> torch.nn.Module:
        """The model from :meth:`init_config` (seeded); scrambled unless ``at_init``, where the
        class asks for it."""
        torch.manual_seed(seed)
        model = self.model_class(self.init_config())
        return scramble(model, seed) if self.scramble_weights and not at_init else model.eval()

    # --------------------------------------------------------------------------- the checks

    def test_save_load_round_trip(self, tmp_path):
        model = self.build()
        model.save_pretrained(tmp_path / "model")
        assert {p.name for p in (tmp_path / "model").iterdir()} == {CONFIG_NAME, WEIGHTS_NAME}
        loaded = self.model_class.from_pretrained(tmp_path / "model")
        assert loaded.config == model.config
        inputs = self.inputs()
        with torch.no_grad():
            assert torch.equal(self.output(loaded.eval(), inputs), self.output(model, inputs))

    def test_determinism(self):
        first, second = self.build(seed=3), self.build(seed=3)
        for (name, a), b in zip(
            first.state_dict().items(), second.state_dict().values(), strict=True
        ):
            assert torch.equal(a, b), f"{name} differs between two builds with one seed"
        inputs = self.inputs()
        with torch.no_grad():
            assert torch.equal(self.output(first, inputs), self.output(first, inputs))
            assert torch.equal(self.output(first, inputs), self.output(second, inputs))

    def test_gradient_reaches_every_parameter(self):
        model = self.build().train()
        self.training_loss(model, self.inputs()).backward()
        dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.any()]
        assert not dead, f"no gradient reaches {dead}"
        bad = [n for n, p in model.named_parameters() if not torch.isfinite(p.grad).all()]
        assert not bad, f"non-finite gradients in {bad}"

    def test_output_at_init(self):
        with torch.no_grad():
            out = self.output(self.build(at_init=True), self.inputs())
        assert out.abs().max() == 0 if self.zero_init_output else out.abs().max() > 0

    def test_bf16_autocast_is_close_to_fp32(self):
        model, inputs = self.build(), self.inputs()
        with torch.no_grad():
            full = self.output(model, inputs).float()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                half = self.output(model, inputs).float()
        error = ((half - full).abs().max() / full.abs().max()).item()
        assert error < self.bf16_tolerance, f"bf16 differs from fp32 by {error:.3g} (relative)"
