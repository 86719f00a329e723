"""Tiny random-weight models of every supported family, built from configs (no downloads)."""

from __future__ import annotations

import random

import torch
import transformers

VOCAB = 128
COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)

# Gemma-style models alternate local (sliding) and global layers.
LOCAL_GLOBAL = ["sliding_attention", "full_attention", "sliding_attention", "full_attention"]

FAMILY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=None),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON),
    "qwen3": lambda: transformers.Qwen3Config(**COMMON, head_dim=16),
    "gemma2": lambda: transformers.Gemma2Config(
        **COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        attn_logit_softcapping=20.0,
        final_logit_softcapping=30.0,
        sliding_window=6,
        layer_types=LOCAL_GLOBAL,
    ),
    "gemma3_text": lambda: transformers.Gemma3TextConfig(
        **COMMON,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=6,
        layer_types=LOCAL_GLOBAL,
    ),
    "phi3": lambda: transformers.Phi3Config(**COMMON, partial_rotary_factor=0.5),
}


def tiny_model(family: str, seed: int = 0, dtype=torch.float32):
    """A random-weight causal LM of `family`, in eval mode."""
    torch.manual_seed(seed)
    config = FAMILY_CONFIGS[family]()
    model = transformers.AutoModelForCausalLM.from_config(config, torch_dtype=dtype)
    return model.eval()


def randomise_new_parameters(model, seed: int = 1) -> None:
    """Move the conversion's new parameters off their identity start, so tests see them travel."""
    from linearize.attention import ConvertedAttention

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, ConvertedAttention):
                for p in module.new_parameters():
                    p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=p.dtype))


WORDS = (
    "the of and to in is was for on that with as by at from his her it an were are which this be or has had not "
    "but one their its first new after who they have two been also other more all into when there time city year "
    "school world she people so over can most made up some out under where only between three during while many "
    "then than through would these such both about before second may known later called since game them part team "
    "film state war like de well each house early music high series him four best life old us no way end back just "
    "name work north south east west river day paris capital france water light"
).split()


def write_words(path, paragraphs: int):
    """Write `paragraphs` paragraphs of 30 random `WORDS` (seed 0) to `path`, a pipeline's `data.dataset`; returns
    `path`."""
    rng = random.Random(0)
    path.write_text("\n\n".join(" ".join(rng.choice(WORDS) for _ in range(30)) for _ in range(paragraphs)))
    return path


def packed_forwards(model, lens, seed=0, mixed=False, separate=True):
    """Logits of sequences of lengths `lens` (random ids) packed into one row with transformers' flash-attention
    kwargs, as DataCollatorWithFlattening makes them (positions restart per sequence), and of each sequence on its
    own, concatenated (with `separate`, else None): `(packed, separate, mixed)`, where `mixed` (with `mixed`, else
    None) is the packed row without the offsets."""
    gen = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, VOCAB, (1, n), generator=gen) for n in lens]
    cu = torch.tensor([0, *torch.tensor(lens).cumsum(0).tolist()], dtype=torch.int32)
    positions = torch.cat([torch.arange(n) for n in lens])[None]
    row = torch.cat(seqs, 1)
    with torch.no_grad():
        packed = model(row, position_ids=positions, use_cache=False, cu_seq_lens_q=cu, cu_seq_lens_k=cu).logits
        separate = torch.cat([model(x, use_cache=False).logits for x in seqs], 1) if separate else None
        mixed = model(row, position_ids=positions, use_cache=False).logits if mixed else None
    return packed, separate, mixed


def tiny_tokenizer():
    """A word-level tokenizer with VOCAB ids: <pad>=0, <s>=1, </s>=2, <unk>=3, then words."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    for word in WORDS:
        if len(vocab) == VOCAB:
            break
        vocab.setdefault(word, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny(family: str, folder, seed: int = 0):
    """Save a tiny model of `family` with the tiny tokenizer into `folder`."""
    tiny_model(family, seed).save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return folder
