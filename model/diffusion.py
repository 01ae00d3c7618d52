"""Flow matching (rectified flow) for packed patch tokens: objective, timestep schedule, samplers.

Convention (SD3 / rectified flow): flow time ``t`` in [0, 1] runs from data to noise,

    x_t = (1 - t) * x0 + t * noise,        velocity v = dx_t/dt = noise - x0.

``t = 0`` is the clean clip, ``t = 1`` pure Gaussian noise; samplers integrate from 1 down to 0.
The network predicts either the clean patches ``x0`` (default) or ``v``; both are converted to
each other with the same ``x_t``:

    v = (x_t - x0) / t,        x0 = x_t - t * v.

**Timesteps.** Training draws ``t = sigmoid(mean + std * n)``, ``n ~ N(0, 1)`` (logit-normal, SD3),
then applies the resolution- and length-aware shift

    shift(L) = clamp(shift * sqrt(L / shift_base_tokens), shift_min, shift_max)
    t' = shift(L) * t / (1 + (shift(L) - 1) * t)

where ``L`` is the clip's token count (all frames, full grid). A clip with 4x the tokens of the
reference has ~2x "less signal per noise level" (SD3 §5.3.2) and gets twice the shift, pushing its
timesteps toward the noisy end. Samplers use the same shift on a uniform grid from 1 to 0.

**Guidance.** Text is replaced by the null condition with probability ``text_dropout`` in training;
the sampler runs the conditional and null rows in one packed forward and combines
``v = v_null + guidance * (v_cond - v_null)``. The null condition is an all-False text mask (the
DiT then skips cross-attention) unless a ``null_text`` embedding (e.g. the encoder's "") is given.

Models follow the :class:`model.dit.DiT` protocol: ``model.config.in_dim``,
``model.encode_text(text, mask) -> cache`` and ``model(x, coords, cu_seqlens, t, text_cache=cache)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from model.config import ModelConfig
from model.patches import PackedBatch, pad_text, segment_ids

PREDICTIONS = ("x0", "velocity")
SHIFT_MODES = ("none", "fixed", "resolution")
SAMPLERS = ("euler", "heun")


@dataclass(frozen=True)
class FlowConfig(ModelConfig):
    """Flow-matching objective and schedule.

    Attributes:
        prediction: what the network outputs, ``"x0"`` (clean patches) or ``"velocity"``.
        loss_space: space of the MSE, ``"x0"`` or ``"velocity"``; ``None`` = ``prediction``. An x0
            loss equals a velocity loss weighted by ``t²``.
        t_eps: lower clamp of ``t`` when converting an x0 prediction to velocity inside the loss.
        logit_mean, logit_std: logit-normal timestep distribution.
        shift_mode: ``"none"`` (shift 1), ``"fixed"`` (``shift``) or ``"resolution"`` (see module doc).
        shift: the fixed shift, or the shift of a ``shift_base_tokens``-token clip.
        shift_base_tokens: reference token count (256 = one 32x32 latent frame with 2x2 patches).
        shift_min, shift_max: clamp of the resolution-aware shift.
        text_dropout: probability of replacing a clip's text with the null condition in training.
        loss_buckets: number of equal-width timestep buckets for the logged loss.
    """

    prediction: str = "x0"
    loss_space: str | None = None
    t_eps: float = 0.05
    logit_mean: float = 0.0
    logit_std: float = 1.0
    shift_mode: str = "resolution"
    shift: float = 1.0
    shift_base_tokens: int = 256
    shift_min: float = 1.0
    shift_max: float = 6.0
    text_dropout: float = 0.1
    loss_buckets: int = 4

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.prediction not in PREDICTIONS:
            raise ValueError(
                f"FlowConfig.prediction={self.prediction!r} is not one of {PREDICTIONS}"
            )
        if self.loss_space not in (None, *PREDICTIONS):
            raise ValueError(
                f"FlowConfig.loss_space={self.loss_space!r} is not None or one of {PREDICTIONS}"
            )
        if self.shift_mode not in SHIFT_MODES:
            raise ValueError(
                f"FlowConfig.shift_mode={self.shift_mode!r} is not one of {SHIFT_MODES}"
            )
        if not (self.shift > 0 and 0 < self.shift_min <= self.shift_max):
            raise ValueError(
                f"FlowConfig needs shift > 0 and 0 < shift_min <= shift_max, got shift={self.shift}, "
                f"shift_min={self.shift_min}, shift_max={self.shift_max}"
            )
        if not 0.0 <= self.text_dropout < 1.0:
            raise ValueError(f"FlowConfig.text_dropout must be in [0, 1), got {self.text_dropout}")
        if (
            self.logit_std <= 0
            or self.t_eps <= 0
            or self.shift_base_tokens < 1
            or self.loss_buckets < 1
        ):
            raise ValueError(
                "FlowConfig.logit_std, t_eps, shift_base_tokens and loss_buckets must be positive"
            )


@dataclass
class LossOutput:
    """Result of :meth:`FlowMatching.training_loss`.

    Attributes:
        loss: scalar, mean over clips of each clip's mean per-token MSE.
        per_clip: (B,) detached per-clip losses.
        t: (B,) flow times used.
        dropped_text: (B,) bool, clips trained with the null condition.
        buckets: ``{"loss_t0.00-0.25": value, ...}`` mean per-clip loss per timestep bucket (for logging).
    """

    loss: Tensor
    per_clip: Tensor
    t: Tensor
    dropped_text: Tensor
    buckets: dict[str, float]


# --------------------------------------------------------------------------- schedule helpers


def _randn(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Draw on the generator's device (CPU by default) then move, so a seed means the same numbers everywhere."""
    gen_device = generator.device if generator is not None else device
    return torch.randn(*shape, generator=generator, device=gen_device).to(device)


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.rand(*shape, generator=generator, device=gen_device).to(device)


def time_shift(t: Tensor, shift: Tensor | float) -> Tensor:
    """``shift * t / (1 + (shift - 1) * t)``: maps 0->0 and 1->1, shift > 1 moves t toward noise."""
    return shift * t / (1 + (shift - 1) * t)


def interpolate(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t noise; ``t`` broadcasts (e.g. (N, 1) per token)."""
    return (1 - t) * x0 + t * noise


def segment_mean(
    values: Tensor, seg_ids: Tensor, num_segments: int, weight: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Weighted mean of (N,) values per segment -> (means (B,), weight sums (B,))."""
    weight = torch.ones_like(values) if weight is None else weight.to(values.dtype)
    total = values.new_zeros(num_segments).index_add(0, seg_ids, values * weight)
    count = values.new_zeros(num_segments).index_add(0, seg_ids, weight)
    return total / count.clamp_min(1e-12), count


def loss_by_timestep_bucket(per_clip: Tensor, t: Tensor, num_buckets: int = 4) -> dict[str, float]:
    """Mean per-clip loss in equal-width buckets of t; empty buckets are left out."""
    per_clip, t = per_clip.detach().float().cpu(), t.detach().float().cpu()
    index = (t * num_buckets).long().clamp(0, num_buckets - 1)
    out = {}
    for k in range(num_buckets):
        sel = index == k
        if sel.any():
            out[f"loss_t{k / num_buckets:.2f}-{(k + 1) / num_buckets:.2f}"] = (
                per_clip[sel].mean().item()
            )
    return out


def _pad_text(text: Tensor, mask: Tensor, length: int) -> tuple[Tensor, Tensor]:
    pad = length - text.shape[1]
    return F.pad(text, (0, 0, 0, pad)), F.pad(mask, (0, pad), value=False)


def null_condition(
    text: Tensor, null_text: Tensor | None = None, null_mask: Tensor | None = None
) -> tuple[Tensor, Tensor]:
    """Null text for each of ``text``'s B rows: the given embedding (Ln, Dt) / (1, Ln, Dt), broadcast,
    or zeros with an all-False mask (no text at all)."""
    batch = text.shape[0]
    if null_text is None:
        return torch.zeros_like(text), torch.zeros(
            text.shape[:2], dtype=torch.bool, device=text.device
        )
    null_text = null_text.to(text.device, text.dtype)
    if null_text.ndim == 2:
        null_text = null_text[None]
    if null_mask is None:
        null_mask = torch.ones(null_text.shape[:2], dtype=torch.bool, device=text.device)
    null_mask = null_mask.to(text.device).bool().reshape(null_text.shape[:2])
    return null_text.expand(batch, -1, -1), null_mask.expand(batch, -1)


def concat_text(a: Tensor, a_mask: Tensor, b: Tensor, b_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Stack two text batches along B, padding the shorter Lt with masked zeros."""
    return pad_text([*a, *b], [*a_mask, *b_mask])


def drop_text(
    text: Tensor,
    text_mask: Tensor | None,
    p: float,
    generator: torch.Generator | None = None,
    null_text: Tensor | None = None,
    null_mask: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Replace each row of text (B, Lt, Dt) by the null condition with probability ``p``.

    Returns text, mask (B, L', ...) and the (B,) bool of dropped rows.
    """
    if text_mask is None:
        text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
    dropped = _rand((text.shape[0],), generator, text.device) < p  # (B,)
    if not dropped.any():
        return text, text_mask.bool(), dropped
    null, nmask = null_condition(text, null_text, null_mask)
    length = max(text.shape[1], null.shape[1])
    text, text_mask = _pad_text(text, text_mask.bool(), length)
    null, nmask = _pad_text(null, nmask, length)
    text = torch.where(dropped[:, None, None], null, text)
    text_mask = torch.where(dropped[:, None], nmask, text_mask)
    return text, text_mask, dropped


# --------------------------------------------------------------------------- flow matching


class FlowMatching:
    """Training objective and samplers of a rectified-flow model (see module docstring)."""

    def __init__(self, config: FlowConfig | None = None):
        self.config = config or FlowConfig()

    # --------------------------------------------------------------------------- schedule

    def shift_for(self, num_tokens: Tensor) -> Tensor:
        """(B,) shift of clips with ``num_tokens`` (B,) tokens each."""
        cfg = self.config
        num_tokens = num_tokens.float()
        if cfg.shift_mode == "none":
            return torch.ones_like(num_tokens)
        if cfg.shift_mode == "fixed":
            return torch.full_like(num_tokens, cfg.shift)
        return (cfg.shift * torch.sqrt(num_tokens / cfg.shift_base_tokens)).clamp(
            cfg.shift_min, cfg.shift_max
        )

    def sample_timesteps(
        self,
        num_tokens: Tensor,
        generator: torch.Generator | None = None,
        quantile: float | None = None,
    ) -> Tensor:
        """Logit-normal, shifted flow times (B,) for clips of ``num_tokens`` (B,) tokens; with
        ``quantile`` (in (0, 1)) that quantile of the distribution instead of a random draw."""
        if quantile is not None:
            if not 0.0 < quantile < 1.0:
                raise ValueError(f"quantile must be in (0, 1), got {quantile}")
            q = torch.full((num_tokens.shape[0],), quantile, dtype=torch.float64)
            n = torch.special.ndtri(q).float().to(num_tokens.device)
        else:
            n = _randn((num_tokens.shape[0],), generator, num_tokens.device)
        t = torch.sigmoid(self.config.logit_mean + self.config.logit_std * n)  # (B,)
        return time_shift(t, self.shift_for(num_tokens))

    def timestep_grid(self, steps: int, num_tokens: Tensor) -> Tensor:
        """(steps + 1, B) sampling times from 1 to 0, uniform then shifted per clip."""
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        base = torch.linspace(1.0, 0.0, steps + 1, device=num_tokens.device)[:, None]  # (S+1, 1)
        return time_shift(base, self.shift_for(num_tokens)[None, :])  # (S+1, B)

    # --------------------------------------------------------------------------- parameterisation

    def to_velocity(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output -> velocity; ``t`` broadcasts against x_t (e.g. (N, 1)) and must be > 0 for x0."""
        return pred if self.config.prediction == "velocity" else (x_t - pred) / t

    def to_x0(self, pred: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """Network output -> clean-patch estimate."""
        return pred if self.config.prediction == "x0" else x_t - t * pred

    # --------------------------------------------------------------------------- training

    def training_loss(
        self,
        model: Any,
        batch: PackedBatch,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        generator: torch.Generator | None = None,
        loss_mask: Tensor | None = None,
        null_text: Tensor | None = None,
        null_mask: Tensor | None = None,
        timestep_quantile: float | None = None,
    ) -> LossOutput:
        """Flow-matching loss of one packed batch.

        Args:
            model: a DiT-like denoiser.
            batch: packed clean latent tokens (``batch.tokens`` = x0).
            text: (B, Lt, Dt) text states, row b for segment b (index your texts by ``batch.indices``).
            text_mask: (B, Lt) bool.
            generator: RNG for timesteps, noise and text dropout.
            loss_mask: (N,) bool/float, tokens that count (e.g. exclude conditioning frames).
            null_text, null_mask: the null condition for text dropout (default: no text).
            timestep_quantile: every clip at this quantile of the timestep distribution instead
                of a random time (a deterministic validation grid).
        """
        cfg = self.config
        x0, seg_ids, device = batch.tokens, batch.seg_ids, batch.tokens.device
        num_clips = batch.num_segments
        t = self.sample_timesteps(batch.grid_tokens.to(device), generator, timestep_quantile)
        noise = _randn(x0.shape, generator, device).to(x0.dtype)  # (N, D)
        t_tok = t[seg_ids][:, None].to(x0.dtype)  # (N, 1)
        x_t = interpolate(x0, noise, t_tok)  # (N, D)
        text, text_mask, dropped = drop_text(
            text, text_mask, cfg.text_dropout, generator, null_text, null_mask
        )
        pred = model(x_t, batch.coords, batch.cu_seqlens, t, text, text_mask)  # (N, D)

        space = cfg.loss_space or cfg.prediction
        if space == "x0":
            pred_s, target = self.to_x0(pred, x_t, t_tok), x0
        elif cfg.prediction == "velocity":
            pred_s, target = pred, noise - x0
        else:  # x0 prediction scored as velocity, with the same clamped t on both sides
            t_safe = t_tok.clamp_min(cfg.t_eps)
            pred_s, target = (x_t - pred) / t_safe, (x_t - x0) / t_safe
        per_token = (pred_s.float() - target.float()).pow(2).mean(dim=-1)  # (N,)
        per_clip, count = segment_mean(per_token, seg_ids, num_clips, loss_mask)  # (B,)
        counted = count > 0
        if not counted.any():
            raise ValueError("loss_mask leaves no token in any clip")
        loss = per_clip[counted].mean()
        return LossOutput(
            loss=loss,
            per_clip=per_clip.detach(),
            t=t.detach(),
            dropped_text=dropped,
            buckets=loss_by_timestep_bucket(per_clip[counted], t[counted], cfg.loss_buckets),
        )

    # --------------------------------------------------------------------------- sampling

    def guided_velocity(
        self,
        model: Any,
        x: Tensor,
        coords: Tensor,
        cu_seqlens: Tensor,
        t: Tensor,
        text_cache: Any,
        guidance: float | None,
    ) -> Tensor:
        """Velocity (N, D) at x (N, D), times t (B,).

        With ``guidance=None`` the cache holds B rows (conditional only). Otherwise it holds 2B rows —
        conditional then null — and both halves run in one packed forward:
        ``v_null + guidance * (v_cond - v_null)``.
        """
        num_tokens = x.shape[0]
        t_tok = t[segment_ids(cu_seqlens)][:, None].to(x.dtype)  # (N, 1)
        if guidance is None:
            pred = model(x, coords, cu_seqlens, t, text_cache=text_cache)  # (N, D)
            return self.to_velocity(pred, x, t_tok)
        x2 = torch.cat([x, x])  # (2N, D)
        cu2 = torch.cat([cu_seqlens, cu_seqlens[1:] + num_tokens])  # (2B + 1,)
        pred = model(
            x2, torch.cat([coords, coords]), cu2, torch.cat([t, t]), text_cache=text_cache
        )  # (2N, D)
        v_cond, v_null = self.to_velocity(pred, x2, torch.cat([t_tok, t_tok])).split(
            num_tokens
        )  # (N, D) each
        return v_null + guidance * (v_cond - v_null)

    def _text_cache(
        self,
        model: Any,
        text: Tensor,
        text_mask: Tensor | None,
        guidance: float,
        null_text: Tensor | None,
        null_mask: Tensor | None,
    ) -> tuple[Any, float | None]:
        if text_mask is None:
            text_mask = torch.ones(text.shape[:2], dtype=torch.bool, device=text.device)
        if guidance == 1.0:  # v_null + 1 * (v_cond - v_null) == v_cond: skip the null half
            return model.encode_text(text, text_mask), None
        null, nmask = null_condition(text, null_text, null_mask)
        both, both_mask = concat_text(text, text_mask.bool(), null, nmask)  # (2B, L', Dt)
        return model.encode_text(both, both_mask), guidance

    @torch.no_grad()
    def integrate(
        self,
        model: Any,
        x: Tensor,
        coords: Tensor,
        cu_seqlens: Tensor,
        grid: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        guidance: float = 1.0,
        method: str = "euler",
        null_text: Tensor | None = None,
        null_mask: Tensor | None = None,
    ) -> Tensor:
        """Integrate the ODE from x at ``grid[0]`` along ``grid`` (S + 1, B) to ``grid[-1]``.

        Euler, or Heun (2nd order; its last step to t = 0 is Euler, as in EDM). The text
        keys/values are computed once and reused at every step.
        """
        if method not in SAMPLERS:
            raise ValueError(f"sampler {method!r} is not one of {SAMPLERS}")
        cache, g = self._text_cache(model, text, text_mask, guidance, null_text, null_mask)
        seg_ids = segment_ids(cu_seqlens)  # (N,)
        for i in range(grid.shape[0] - 1):
            t, t_next = grid[i], grid[i + 1]  # (B,) each
            dt = (t_next - t)[seg_ids][:, None].to(x.dtype)  # (N, 1)
            v = self.guided_velocity(model, x, coords, cu_seqlens, t, cache, g)  # (N, D)
            x_next = x + dt * v
            if method == "heun" and bool((t_next > 0).all()):
                v_next = self.guided_velocity(
                    model, x_next, coords, cu_seqlens, t_next, cache, g
                )  # (N, D)
                x_next = x + dt * 0.5 * (v + v_next)
            x = x_next
        return x

    def _start(
        self,
        shape: Sequence[int],
        cu_seqlens: Tensor,
        steps: int,
        remaining: int,
        noise: Tensor | None,
        generator: torch.Generator | None,
        seed: int | None,
        num_tokens: Tensor | None,
    ) -> tuple[Tensor, Tensor]:
        """What every sampler starts from: the noise (given, or drawn from ``generator`` /
        ``seed``) and the last ``remaining`` steps of the shifted time grid, (remaining + 1, B)."""
        device = cu_seqlens.device
        if noise is None:
            if generator is None and seed is not None:
                generator = torch.Generator().manual_seed(seed)
            noise = _randn(shape, generator, device)
        tokens = torch.diff(cu_seqlens) if num_tokens is None else num_tokens
        grid = self.timestep_grid(steps, tokens.to(device))  # (steps + 1, B)
        return noise, grid[steps - remaining :]

    def sample(
        self,
        model: Any,
        coords: Tensor,
        cu_seqlens: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        steps: int = 30,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        noise: Tensor | None = None,
        num_tokens: Tensor | None = None,
        **solver: Any,
    ) -> Tensor:
        """Generate B packed clips from noise.

        Args:
            coords, cu_seqlens: the packing of the clips to generate (``patches.pack_grids``).
            text, text_mask: (B, Lt, Dt) / (B, Lt) prompts, one row per clip.
            steps: solver steps.
            generator / seed: RNG of the initial noise; the ODE is deterministic given it.
            noise: (N, in_dim) initial noise instead of drawing it.
            num_tokens: (B,) tokens per clip for the shift (default: the segment lengths).
            solver: ``guidance`` (CFG scale, 1 = none), ``method`` (``"euler"`` / ``"heun"``),
                ``null_text`` / ``null_mask``: as :meth:`integrate`.

        Returns:
            (N, in_dim) clean tokens; ``model.patches.unpatchify`` each segment to get latents.
        """
        shape = (coords.shape[0], model.config.in_dim)
        x, grid = self._start(shape, cu_seqlens, steps, steps, noise, generator, seed, num_tokens)
        return self.integrate(model, x, coords, cu_seqlens, grid, text, text_mask, **solver)

    def sdedit(
        self,
        model: Any,
        x0: Tensor,
        coords: Tensor,
        cu_seqlens: Tensor,
        text: Tensor,
        text_mask: Tensor | None = None,
        *,
        strength: float,
        steps: int = 30,
        generator: torch.Generator | None = None,
        seed: int | None = None,
        noise: Tensor | None = None,
        num_tokens: Tensor | None = None,
        **solver: Any,
    ) -> Tensor:
        """SDEdit (Meng et al. 2022): noise the input tokens x0 (N, D) to the time that leaves
        ``round(strength * steps)`` steps of the shifted schedule, then denoise those steps with
        ``text`` (the new prompt). ``strength = 0`` returns the input; at ``1`` the input is
        ignored and, with the same ``noise``, the result equals :meth:`sample`. Other arguments
        as :meth:`sample`."""
        if not 0.0 <= strength <= 1.0:
            raise ValueError(f"strength must be in [0, 1], got {strength}")
        remaining = round(strength * steps)
        if remaining == 0:
            return x0.clone()
        noise, grid = self._start(
            x0.shape, cu_seqlens, steps, remaining, noise, generator, seed, num_tokens
        )
        t0 = grid[0][segment_ids(cu_seqlens)][:, None].to(x0.dtype)  # (N, 1)
        x = interpolate(x0, noise.to(x0.dtype), t0)  # (N, D)
        return self.integrate(model, x, coords, cu_seqlens, grid, text, text_mask, **solver)
