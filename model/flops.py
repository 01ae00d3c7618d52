"""Parameter and FLOP counts of a DiT, from its config alone (no model is built).

FLOPs count 2 per multiply-add of every matmul and attention product; elementwise work, norms
and softmax are left out (a few percent at these widths). Training is forward + backward =
3x the forward; the trainer's MFU and the benchmarks' utilisation are measured against these.
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


def forward_flops(
    config: DiTConfig, seqlens: Sequence[int], text_len: int | Sequence[int] = 0
) -> int:
    """Matmul + attention FLOPs (2 per multiply-add) of one forward over clips of ``seqlens`` tokens.

    ``text_len`` is the number of real text tokens per clip (one int for all, or one per clip).
    Elementwise ops, norms and softmax are ignored (a few percent at these widths).
    """
    d, m = config.hidden_size, config.mlp_hidden
    text_lens = [text_len] * len(seqlens) if isinstance(text_len, int) else list(text_len)
    if len(text_lens) != len(seqlens):
        raise ValueError(f"text_len has {len(text_lens)} entries for {len(seqlens)} clips")
    per_token_layer = 2 * (
        3 * d * d + d * d + d * d + d * d + 2 * d * m
    )  # qkv, proj, cross q, cross proj, MLP
    total = 0
    for n, lt in zip(seqlens, text_lens, strict=True):
        layer = n * per_token_layer
        layer += 4 * n * n * d  # self-attention QK^T and AV
        layer += 4 * n * lt * d  # cross-attention QK^T and AV
        layer += 2 * lt * 2 * d * d  # text K/V projections
        layer += 2 * 6 * d * d  # adaLN modulation (once per clip)
        total += config.depth * layer
        total += 2 * n * (config.in_dim * d + d * config.out_dim)  # patch embed + final linear
        total += 2 * lt * (config.text_dim * d + d * d)  # text projection
        if config.pooled_text:
            total += 2 * (config.text_dim * d + d * d)  # pooled text (once per clip)
    return total


def flops_per_token(config: DiTConfig, seq_len: int, text_len: int = 0) -> float:
    """Forward FLOPs per token for a clip of ``seq_len`` tokens (grows with seq_len through attention)."""
    return forward_flops(config, [seq_len], text_len) / seq_len


def train_flops(
    config: DiTConfig, seqlens: Sequence[int], text_len: int | Sequence[int] = 0
) -> int:
    """Training FLOPs of one step over clips of ``seqlens`` tokens: forward + backward = 3x forward
    (gradient checkpointing adds another forward of the blocks, not counted here)."""
    return 3 * forward_flops(config, seqlens, text_len)
