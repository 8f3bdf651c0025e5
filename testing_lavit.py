# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Tiny Qwen2.5-VL checkpoints built in code, with no download: for tests, benchmarks and the CPU demo.

A real Qwen2.5-VL repository holds the model, a byte-level BPE tokenizer with Qwen's special tokens and chat
template, and a `Qwen2VLImageProcessor` configuration. `save_tiny_qwen2_5_vl` writes the same layout from a
tokenizer trained here with `tokenizers` and randomly initialised weights, so every code path that takes a hub
id (`Qwen/Qwen2.5-VL-3B-Instruct`) can be exercised offline on a path instead.
"""

from __future__ import annotations

import os
import random

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil


QWEN_SPECIAL_TOKENS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
]

# Qwen2.5-VL's chat template, written out for the tiny tokenizer: a default system turn, images as
# <|vision_start|><|image_pad|><|vision_end|>, and "<|im_start|>assistant\n" as the generation prompt.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}"
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}"
    "<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}<|im_end|>\n"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}<|im_end|>\n"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_WORDS = (
    "the a an of to in on at is are was what which where who how many color colour shape size left right top bottom "
    "above below next behind front red green blue yellow purple orange white black gray brown pink small large "
    "medium tiny big circle square triangle star object objects image picture photo question answer please provide "
    "bounding box coordinate region that can help you better describe this these there one two three four five six "
    "seven eight nine ten yes no dog cat car person tree house sky water road sign text number option options choose "
    "letter given choices directly expert multimodal large language model process visual information through "
    "specialized latent tokens ensure precise alignment between perception and textual reasoning helpful assistant "
    "system user"
).split()


def tiny_corpus(num_sentences: int = 2000, seed: int = 0) -> list[str]:
    """A deterministic English-like corpus covering the words of prompts, questions and answers used here."""
    rng = random.Random(seed)
    sentences = [" ".join(_WORDS[i : i + 12]) for i in range(0, len(_WORDS), 12)]
    for _ in range(num_sentences):
        words = [rng.choice(_WORDS) for _ in range(rng.randint(3, 14))]
        sentence = " ".join(words)
        if rng.random() < 0.3:
            sentence = sentence.capitalize() + rng.choice(["?", ".", "!", ":"])
        if rng.random() < 0.3:
            sentence += f" ({rng.choice('ABCDabcd')}) {rng.randint(0, 999)}, [{rng.randint(0, 99)}]"
        sentences.append(sentence)
    return sentences


def train_tiny_tokenizer(vocab_size: int = 512, corpus: list[str] | None = None) -> Qwen2Tokenizer:
    """Trains a byte-level BPE with `tokenizers` and wraps it as a `Qwen2Tokenizer` with Qwen's special tokens.

    The result behaves as Qwen's tokenizer does (same pre-tokenizer, special tokens, chat template, `<|im_end|>`
    as end of turn), only with a small vocabulary.
    """
    corpus = corpus if corpus is not None else tiny_corpus()
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(corpus, trainer=trainer)
    state = bpe.model.__getstate__()
    import json

    model_state = json.loads(state)
    vocab = model_state["vocab"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model_state["merges"]]
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        additional_special_tokens=QWEN_SPECIAL_TOKENS[1:],
    )
    tokenizer.chat_template = QWEN2_5_VL_CHAT_TEMPLATE
    return tokenizer


def tiny_image_processor(min_tokens: int = 4, max_tokens: int = 256) -> Qwen2VLImageProcessorPil:
    """Qwen2.5-VL's torchvision-free image processor, bounded to between `min_tokens` and `max_tokens` merged
    visual tokens (28 x 28 pixels each)."""
    return Qwen2VLImageProcessorPil(
        size={"shortest_edge": min_tokens * 28 * 28, "longest_edge": max_tokens * 28 * 28},
        patch_size=14,
        merge_size=2,
        temporal_patch_size=2,
    )


def tiny_qwen2_5_vl_config(
    tokenizer: Qwen2Tokenizer,
    text_hidden_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 4,
    num_key_value_heads: int = 2,
    intermediate_size: int = 128,
    vision_hidden_size: int = 32,
    vision_depth: int = 2,
    vision_heads: int = 2,
    tie_word_embeddings: bool = False,
    vocab_size: int | None = None,
) -> Qwen2_5_VLConfig:
    """A small Qwen2.5-VL configuration wired to `tokenizer`'s special token ids.

    The defaults keep grouped-query attention (4 query heads over 2 key/value heads) and the multimodal RoPE
    sections of the real model, at a size that runs a forward pass in milliseconds on a CPU.
    """
    head_dim = text_hidden_size // num_attention_heads
    if head_dim % 2 or text_hidden_size % num_attention_heads:
        raise ValueError(f"text_hidden_size {text_hidden_size} must split into heads of even width")
    half = head_dim // 2
    # Qwen2.5-VL splits the rotary half-width into temporal, height and width sections (16, 24, 24 of 64).
    mrope_section = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    ids = tokenizer.convert_tokens_to_ids
    return Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=vocab_size or len(tokenizer),
            hidden_size=text_hidden_size,
            intermediate_size=intermediate_size,
            num_hidden_layers=num_hidden_layers,
            num_attention_heads=num_attention_heads,
            num_key_value_heads=num_key_value_heads,
            max_position_embeddings=4096,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope_section},
            bos_token_id=None,
            eos_token_id=ids("<|im_end|>"),
            pad_token_id=ids("<|endoftext|>"),
        ),
        vision_config=dict(
            depth=vision_depth,
            hidden_size=vision_hidden_size,
            intermediate_size=2 * vision_hidden_size,
            num_heads=vision_heads,
            out_hidden_size=text_hidden_size,
            patch_size=14,
            spatial_merge_size=2,
            temporal_patch_size=2,
            window_size=112,
            fullatt_block_indexes=[vision_depth - 1],
        ),
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
        tie_word_embeddings=tie_word_embeddings,
    )


def build_tiny_qwen2_5_vl(seed: int = 0, tokenizer: Qwen2Tokenizer | None = None, **config_kwargs):
    """Returns `(model, tokenizer, image_processor)`: a stock `Qwen2_5_VLForConditionalGeneration` with random
    weights (seeded), its tokenizer (`tokenizer`, or one trained on the tiny corpus) and image processor."""
    tokenizer = tokenizer if tokenizer is not None else train_tiny_tokenizer()
    config = tiny_qwen2_5_vl_config(tokenizer, **config_kwargs)
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.generation_config.eos_token_id = config.text_config.eos_token_id
    model.generation_config.pad_token_id = config.text_config.pad_token_id
    return model.eval(), tokenizer, tiny_image_processor()


def save_tiny_qwen2_5_vl(output_dir: str | os.PathLike, seed: int = 0, tokenizer: Qwen2Tokenizer | None = None,
                         **config_kwargs) -> str:
    """Writes a tiny stock Qwen2.5-VL checkpoint in the layout of a real hub repository (model weights and
    config, tokenizer files with the chat template, `preprocessor_config.json`) and returns its path."""
    model, tokenizer, image_processor = build_tiny_qwen2_5_vl(seed=seed, tokenizer=tokenizer, **config_kwargs)
    output_dir = os.fspath(output_dir)
    model.save_pretrained(output_dir)
    tokenizer.save_pretrained(output_dir)
    image_processor.save_pretrained(output_dir)
    return output_dir
