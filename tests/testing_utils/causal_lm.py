"""A tiny random causal LM saved the way real ones are, for the ``hf`` prompt expander.

:func:`save_tiny_causal_lm` writes a ``GPT2LMHeadModel`` (1 layer, width 16, 2 heads) and a
``PreTrainedTokenizerFast`` over a small word-level caption vocabulary (built offline, no hub),
with ``save_pretrained``: load it with ``AutoModelForCausalLM`` / ``AutoTokenizer``. The same
seed gives the same weights.
"""

from __future__ import annotations

from pathlib import Path

EOS, UNK, PAD = "<|endoftext|>", "<unk>", "<pad>"
ROLES = ("<|system|>", "<|user|>", "<|assistant|>")
CAPTION_WORDS = """
a an the of on in to and with is at from its
red green blue yellow orange purple white black grey pink
ball balls circle circles square squares triangle cube star disc shape object
bouncing bounces bounce sliding slides slide circling circles rotating spinning moving
left right up down top bottom centre across around slowly quickly smoothly
background plain gradient texture camera static pans shot lasts seconds frames per second
wide tall landscape portrait video still image small large soft light
short long . , : ! ?
""".split()  # noqa: SIM905 (a word list reads better as text)
# roles as special tokens, then the content, then a generation prompt for the assistant
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def tiny_word_tokenizer(chat_template: bool = False):
    """A word-level fast tokenizer over :data:`CAPTION_WORDS` (unknown words -> ``<unk>``);
    ``chat_template``: with :data:`CHAT_TEMPLATE` and the role tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tokens = [PAD, UNK, EOS, *ROLES, *dict.fromkeys(CAPTION_WORDS)]
    backend = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token=UNK))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token=UNK,
        pad_token=PAD,
        eos_token=EOS,
        bos_token=EOS,
        additional_special_tokens=list(ROLES),
    )
    if chat_template:
        tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def save_tiny_causal_lm(path: str | Path, *, seed: int = 0, chat_template: bool = False) -> Path:
    """Write a tiny random GPT-2 and its word-level tokenizer to ``path`` (created); return it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = tiny_word_tokenizer(chat_template)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_positions=1024,
        n_embd=16,
        n_layer=1,
        n_head=2,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    GPT2LMHeadModel(config).eval().save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
