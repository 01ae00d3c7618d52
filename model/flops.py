"""Parameter and FLOP counts of a DiT, from its config alone (no model is built).

How the compute budget is counted
---------------------------------
FLOPs are 2 per multiply-add of every matmul and attention product that executes; elementwise
work, norms, RoPE and softmax are left out (a few percent at these widths). A step over a pack of
clips with ``n_b`` tokens and ``l_b`` real text tokens each (``D`` width, ``M`` MLP width,
``depth`` blocks) costs, forward::

    per token, per block   2 (3D² + D² + D² + D² + 2DM)     qkv, proj, cross q, cross proj, MLP
                                                            (= 28 D² at mlp_ratio 4)
    per clip,  per block   4 n_b² D                         self-attention QKᵀ + AV, within the
                                                            clip only: quadratic in n_b, not in
                                                            the pack's length
                           4 n_b k_b D                      cross-attention to k_b text keys
                           2 l_b · 2D²                      text K/V projections (real tokens)
                           2 · 6D²                          adaLN modulation (once per clip)
    embeddings / head      2 n_b (in_dim D + D out_dim)     patch embedding, final linear
                           2 l_b (text_dim D + D²)          text projection, real tokens only
                           2 (F D + D²) + 2 · 2D²           timestep MLP, final adaLN, per clip
                           2 (text_dim D + D²)              pooled text MLP, per clip (if on)

Training is forward + backward, counted as what autograd and the kernels execute
(``torch.utils.flop_counter.FlopCounterMode`` over a real training step agrees exactly on CPU,
at three sizes and two packings, see ``tests/model/test_flops.py``):

* a linear's backward is 2x its forward (input and weight gradients), but 1x where its input
  needs no gradient: the patch embedding (noisy latents), the text projection's and pooled
  MLP's first linear (text encoder states) and the timestep MLP's first linear (sinusoids);
* attention's backward is 2.5x its forward: the fused kernels (SDPA's CPU/CUDA flash and
  efficient kernels, FlexAttention) recompute the scores, 5 matmuls to the forward's 2. The CPU
  bf16 path that runs attention as two plain matmuls (``model.attention.matmul_attention``)
  does 2x instead, ~0.5 x attention-forward less than counted here;
* gradient checkpointing (``DiTConfig.gradient_checkpointing``) recomputes every block's forward
  in backward: ``train_flops(..., checkpointing=True)`` adds it (blocks only: text K/V are
  computed outside the checkpoint); by default it is not counted, as model-FLOP utilisation
  leaves recomputation out.

So a training step is ≈ 6·N FLOPs per clip token, N = depth·(6D² + 2DM) + D·out_dim the
per-token matmul weights (14 D² per block at mlp_ratio 4), plus 4·in_dim·D for the patch
embedding (its input needs no gradient); plus, per block and clip, 14 n_b² D of self-attention
(4 forward + 10 backward), 14 n_b k_b D of cross-attention, 12 l_b D² of text K/V and
36 D² of adaLN; plus the per-clip embeddings. Short clips are dominated by the 6·N term;
self-attention takes over once n_b ≳ 6 D (a clip's length, not the pack's).

Attention is counted per clip, as ``"sdpa_segments"`` (the CPU default) runs it; ``"flex"`` (CUDA)
skips the masked 128 x 128 blocks, so it does this plus block rounding; ``"dense_mask"`` (tests)
computes the whole pack² and is not what is counted.

Text keys ``k_b``: the ``"sdpa_segments"`` backend (the CPU default) attends each run of
consecutive equal-length clips to text keys up to the run's longest real caption (text rows are
left-aligned, as ``model.patches.pad_text`` builds them; ``pack_patches`` puts equal lengths next
to each other), so a short caption packed beside longer ones of clips of the same length reads
their padding too: ``k_b = max(l_j for clips j with n_j = n_b)`` (:func:`run_text_keys`). Pass
``text_keys`` to count another layout (e.g. ``text_keys=text_len`` for attention over real
tokens only). The text projection and text K/V projections run over the real tokens only
(``DiT.encode_text`` gathers them), so padded text positions cost nothing there.

The trainer's MFU and the benchmarks' utilisation are measured against :func:`train_flops`.
"""

from __future__ import annotations

from collections.abc import Sequence

from model.dit import DiTConfig


def count_params(config: DiTConfig) -> int:
    """Exact parameter count of ``DiT(config)`` without building it."""
    d, m, hd = config.hidden_size, config.mlp_hidden, config.head_dim
    qk = 2 * hd if config.qk_norm else 0
    block = (
        (3 * d * d + 3 * d)
        + qk
        + (d * d + d)  # self-attention: qkv, norms, proj
        + 2 * d  # norm2 (affine)
        + (d * d + d)
        + (2 * d * d + 2 * d)
        + qk
        + (d * d + d)  # cross-attention: q, kv, norms, proj
        + (d * m + m)
        + (m * d + d)  # MLP
        + (6 * d * d + 6 * d)  # adaLN modulation
    )
    embed = (
        (config.in_dim * d + d)  # patch tokens
        + (config.frequency_embedding_size * d + d)
        + (d * d + d)  # timestep MLP
        + (config.text_dim * d + d)
        + (d * d + d)  # text projection
        + ((config.text_dim * d + d) + (d * d + d) if config.pooled_text else 0)  # pooled text
    )
    final = (2 * d * d + 2 * d) + (d * config.out_dim + config.out_dim)
    return config.depth * block + embed + final


def _per_clip(values: int | Sequence[int] | None, num_clips: int, name: str) -> list[int] | None:
    if values is None:
        return None
    values = [values] * num_clips if isinstance(values, int) else list(values)
    if len(values) != num_clips:
        raise ValueError(f"{name} has {len(values)} entries for {num_clips} clips")
    return values


def run_text_keys(seqlens: Sequence[int], text_lens: Sequence[int]) -> list[int]:
    """Text keys each clip's cross-attention reads under ``"sdpa_segments"``: the longest real
    text among the pack's clips of its length.

    The backend batches each run of consecutive equal-length clips to keys up to the run's last
    real text token (text rows left-aligned); ``pack_patches`` orders a pack's clips longest
    first, so equal lengths form one run whatever order ``seqlens`` comes in (the trainer passes
    the batch's order, the sweep's planner the stream's).
    """
    longest: dict[int, int] = {}
    for n, lt in zip(seqlens, text_lens, strict=True):
        longest[n] = max(longest.get(n, 0), lt)
    return [longest[n] for n in seqlens]


def _step_flops(
    config: DiTConfig,
    seqlens: Sequence[int],
    text_len: int | Sequence[int],
    text_keys: int | Sequence[int] | None,
) -> tuple[int, int, int]:
    """(forward, backward, forward of the blocks alone) FLOPs of one step; see the module doc."""
    d, m = config.hidden_size, config.mlp_hidden
    text_lens = _per_clip(text_len, len(seqlens), "text_len")
    keys = _per_clip(text_keys, len(seqlens), "text_keys") or run_text_keys(seqlens, text_lens)
    # per token per block: qkv, proj, cross q, cross proj, MLP (all inputs need gradients)
    token_block = 2 * (3 * d * d + d * d + d * d + d * d + 2 * d * m)
    fwd = bwd = blocks = 0
    for n, lt, k in zip(seqlens, text_lens, keys, strict=True):
        dense = n * token_block + 2 * 6 * d * d  # + adaLN modulation, once per clip
        attention = 4 * n * n * d + 4 * n * k * d  # self (within the clip) + cross QKᵀ and AV
        text_kv = 2 * lt * 2 * d * d  # cross-attention K/V of the real text tokens
        blocks += config.depth * (dense + attention)
        fwd += config.depth * (dense + attention + text_kv)
        bwd += config.depth * (2 * dense + 5 * attention // 2 + 2 * text_kv)
        # linears whose input needs no gradient (1x backward), then those whose input does (2x)
        frozen_in = 2 * n * config.in_dim * d  # patch embedding of the noisy latents
        frozen_in += 2 * lt * config.text_dim * d  # text projection, first linear (real tokens)
        frozen_in += 2 * config.frequency_embedding_size * d  # timestep MLP, first linear
        grad_in = 2 * n * d * config.out_dim  # final linear
        grad_in += 2 * lt * d * d + 2 * d * d + 2 * 2 * d * d  # text, timestep 2nd; final adaLN
        if config.pooled_text:
            frozen_in += 2 * config.text_dim * d  # pooled text MLP, once per clip
            grad_in += 2 * d * d
        fwd += frozen_in + grad_in
        bwd += frozen_in + 2 * grad_in
    return fwd, bwd, blocks


def forward_flops(
    config: DiTConfig,
    seqlens: Sequence[int],
    text_len: int | Sequence[int] = 0,
    *,
    text_keys: int | Sequence[int] | None = None,
) -> int:
    """Matmul + attention FLOPs (2 per multiply-add) of one forward over clips of ``seqlens`` tokens.

    ``text_len`` is the number of real text tokens per clip (one int for all, or one per clip;
    0 for a clip whose text was dropped). ``text_keys`` is the number of text keys each clip's
    cross-attention reads; default: as ``"sdpa_segments"`` pads them (:func:`run_text_keys`).
    Elementwise ops, norms and softmax are ignored (a few percent at these widths).
    """
    return _step_flops(config, seqlens, text_len, text_keys)[0]


def flops_per_token(config: DiTConfig, seq_len: int, text_len: int = 0) -> float:
    """Forward FLOPs per token for a clip of ``seq_len`` tokens (grows with seq_len through attention)."""
    return forward_flops(config, [seq_len], text_len) / seq_len


def train_flops(
    config: DiTConfig,
    seqlens: Sequence[int],
    text_len: int | Sequence[int] = 0,
    *,
    text_keys: int | Sequence[int] | None = None,
    checkpointing: bool = False,
) -> int:
    """Training FLOPs of one step (forward + backward) over clips of ``seqlens`` tokens.

    Backward is counted as it executes (see the module docstring): 2x the forward of linears
    whose input needs a gradient, 1x of those whose input does not (patch embedding, the text,
    pooled and timestep MLPs' first linears), 2.5x of attention (fused kernels recompute the
    scores) — about 3x the forward overall. ``checkpointing=True`` adds the forward of the
    blocks that gradient checkpointing recomputes in backward (left out by default, as MFU does).
    ``text_len`` and ``text_keys`` as in :func:`forward_flops`.
    """
    fwd, bwd, blocks = _step_flops(config, seqlens, text_len, text_keys)
    return fwd + bwd + (blocks if checkpointing else 0)
