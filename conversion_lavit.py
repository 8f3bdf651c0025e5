# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Turning a Qwen2.5-VL checkpoint into a LaViT checkpoint, and a trained LaViT back into a stock one.

`convert_qwen2_5_vl_to_lavit` adds the K latent tokens to the tokenizer (their embedding and output rows start at
the mean of the existing rows), adds the concept head and writes a checkpoint that loads offline with
`AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`, `AutoProcessor` and `pipeline`.

`export_to_qwen2_5_vl` drops the head and the remote code: the result is a plain Qwen2.5-VL checkpoint (the latent
tokens kept in its tokenizer and chat template) that stock transformers, vLLM and SGLang load unpatched.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch
from tokenizers import AddedToken
from transformers import (
    AutoImageProcessor,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedModel,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
)

from cli_lavit import check_output_dir, checkpoint_model_type
from configuration_lavit import LavitConfig, latent_token_strings
from modeling_lavit import LavitForConditionalGeneration
from processing_lavit import LavitProcessor, remove_latent_tokens_from_chat_template


logger = logging.getLogger(__name__)

LAVIT_CONFIG_FIELDS = (
    "num_latent_tokens",
    "latent_token_template",
    "latent_token_ids",
    "teacher_hidden_size",
    "concept_head_hidden_size",
    "gate_scope",
    "latent_attention_layers",
)
_DROPPED_CONFIG_KEYS = ("model_type", "architectures", "auto_map", "transformers_version")


def _transplant(source: PreTrainedModel, target_cls, config, drop_prefix: str | None = None) -> PreTrainedModel:
    """Builds `target_cls(config)` holding `source`'s tensors without a second copy of the weights.

    The target is built on the meta device and takes the source's parameters and persistent buffers by
    assignment (those under `drop_prefix` excepted); non-persistent buffers (rotary frequencies) are copied by
    name. Modules the source lacks (the concept head) are left on the meta device for the caller to materialise.
    """
    with torch.device("meta"):
        target = target_cls(config)
    state = source.state_dict()
    if drop_prefix is not None:
        state = {k: v for k, v in state.items() if not k.startswith(drop_prefix)}
    result = target.load_state_dict(state, strict=False, assign=True)
    if result.unexpected_keys:
        raise ValueError(f"Weights of the source model have no place in {target_cls.__name__}: {result.unexpected_keys}")
    source_buffers = dict(source.named_buffers())
    for name, _ in list(target.named_buffers()):
        if name in source_buffers:
            module_name, _, buffer_name = name.rpartition(".")
            module = target.get_submodule(module_name) if module_name else target
            persistent = buffer_name not in module._non_persistent_buffers_set
            module.register_buffer(buffer_name, source_buffers[name], persistent=persistent)
    if getattr(config, "tie_word_embeddings", False):
        target.tie_weights()
    return target


def _mean_initialise_rows(matrix: torch.Tensor, rows: list[int], num_existing: int) -> None:
    """Sets `matrix[rows]` to the mean of `matrix[:num_existing]` (computed in float32)."""
    with torch.no_grad():
        mean = matrix[:num_existing].float().mean(dim=0)
        matrix[rows] = mean.to(matrix.dtype)


def _not_qwen_message(name, model_type) -> str:
    return (
        f"{name} is a '{model_type}' model; LaViT converts Qwen2.5-VL checkpoints (model_type 'qwen2_5_vl'), e.g. "
        "Qwen/Qwen2.5-VL-3B-Instruct. A LaViT checkpoint is converted already."
    )


def _load_base(base, tokenizer, image_processor, dtype):
    if isinstance(base, (str, os.PathLike)):
        model_type = checkpoint_model_type(os.fspath(base))
        if model_type != "qwen2_5_vl":  # checked before the weights are read
            raise ValueError(_not_qwen_message(base, model_type))
        model = Qwen2_5_VLForConditionalGeneration.from_pretrained(base, dtype=dtype)
        tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(base)
        image_processor = image_processor if image_processor is not None else AutoImageProcessor.from_pretrained(base)
        return model, tokenizer, image_processor, str(base)
    if not isinstance(base, PreTrainedModel):
        raise TypeError(f"base must be a checkpoint path, a hub id or a Qwen2.5-VL model, got {type(base).__name__}.")
    if tokenizer is None or image_processor is None:
        raise ValueError("When base is a model object, pass its tokenizer and image_processor too.")
    return base, tokenizer, image_processor, getattr(base.config, "_name_or_path", "") or "unknown"


def convert_qwen2_5_vl_to_lavit(
    base,
    output_dir: str | os.PathLike,
    num_latent_tokens: int = 4,
    teacher_hidden_size: int = 5120,
    latent_token_template: str = "<v-trace{index}>",
    concept_head_hidden_size: int | None = None,
    gate_scope: str = "after_image",
    latent_attention_layers: str | list[int] = "all",
    tokenizer=None,
    image_processor=None,
    dtype: str | torch.dtype = "auto",
    seed: int = 0,
) -> str:
    """Converts a Qwen2.5-VL checkpoint into a LaViT checkpoint at `output_dir` and returns the path.

    Args:
        base: a hub id (`"Qwen/Qwen2.5-VL-3B-Instruct"`), a local checkpoint path, or a loaded
            `Qwen2_5_VLForConditionalGeneration` (then pass `tokenizer` and `image_processor`; the model's embedding
            matrices are resized in place).
        output_dir: where the LaViT checkpoint is written.
        num_latent_tokens: K (paper: 4).
        teacher_hidden_size: the width of the teacher's V_sem (5120 for Qwen2.5-VL-32B).
        latent_token_template: spelling of the latent tokens, `{index}` from 1 to K.
        concept_head_hidden_size: hidden width of the concept head (default: the text hidden size).
        gate_scope, latent_attention_layers: see `LavitConfig`.
        tokenizer, image_processor: override the base checkpoint's.
        dtype: dtype to load a checkpoint in (`"auto"`: as stored).
        seed: seeds the concept head's initialisation.
    """
    if isinstance(base, (str, os.PathLike)):
        check_output_dir(os.fspath(output_dir), os.fspath(base))  # before the weights are read
    model, tokenizer, image_processor, base_name = _load_base(base, tokenizer, image_processor, dtype)
    if getattr(model.config, "model_type", None) != "qwen2_5_vl" or isinstance(model, LavitForConditionalGeneration):
        raise ValueError(_not_qwen_message(base_name, getattr(model.config, "model_type", None)))

    latent_tokens = latent_token_strings(num_latent_tokens, latent_token_template)
    vocab = tokenizer.get_vocab()
    already = [token for token in latent_tokens if token in vocab]
    if already:
        raise ValueError(
            f"The tokenizer of {base_name} already holds latent tokens {already}; convert the original Qwen2.5-VL "
            "checkpoint, not a LaViT one."
        )
    num_existing = len(tokenizer)
    tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in latent_tokens], special_tokens=True)
    latent_ids = tokenizer.convert_tokens_to_ids(latent_tokens)

    fields = {k: v for k, v in model.config.to_dict().items() if k not in _DROPPED_CONFIG_KEYS}
    config = LavitConfig(
        **fields,
        num_latent_tokens=num_latent_tokens,
        latent_token_template=latent_token_template,
        teacher_hidden_size=teacher_hidden_size,
        concept_head_hidden_size=concept_head_hidden_size,
        gate_scope=gate_scope,
        latent_attention_layers=latent_attention_layers,
    )
    lavit = _transplant(model, LavitForConditionalGeneration, config)
    parameter = next(model.parameters())
    torch.manual_seed(seed)
    head = type(lavit.concept_head)(config).to(device=parameter.device, dtype=parameter.dtype)
    lavit.concept_head = head
    lavit._init_weights(head.fc1)
    lavit._init_weights(head.fc2)
    lavit.register_buffer("sensory_gate", torch.tensor(1.0, device=parameter.device), persistent=False)

    # The model's vocabulary is often padded beyond the tokenizer (151936 rows for 151665 tokens in Qwen2.5-VL),
    # so the latent tokens may fit without a resize; their rows are set to the mean either way.
    needed = max(latent_ids) + 1
    if needed > config.text_config.vocab_size:
        lavit.resize_token_embeddings(needed, mean_resizing=False)
    _mean_initialise_rows(lavit.get_input_embeddings().weight, latent_ids, num_existing)
    output_embeddings = lavit.get_output_embeddings().weight
    if output_embeddings.data_ptr() != lavit.get_input_embeddings().weight.data_ptr():
        _mean_initialise_rows(output_embeddings, latent_ids, num_existing)
    lavit.config.text_config.vocab_size = lavit.get_input_embeddings().weight.shape[0]
    lavit.config.latent_token_ids = list(latent_ids)
    lavit.config._validate_lavit_fields()
    lavit.config.architectures = ["LavitForConditionalGeneration"]

    generation_config = getattr(model, "generation_config", None) or GenerationConfig()
    generation_config = GenerationConfig.from_dict(generation_config.to_dict())
    # The processor forces the latent block; the model must not write latent tokens again inside its answer.
    generation_config.suppress_tokens = sorted(set(list(generation_config.suppress_tokens or []) + list(latent_ids)))
    lavit.generation_config = generation_config

    processor = LavitProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        num_latent_tokens=num_latent_tokens,
        latent_token_template=latent_token_template,
    )
    output_dir = os.fspath(output_dir)
    save_lavit_checkpoint(lavit, processor, output_dir, base_model=base_name)
    logger.info("Converted %s to LaViT (K=%d, latent ids %s) in %s", base_name, num_latent_tokens, latent_ids, output_dir)
    return output_dir


def save_lavit_checkpoint(model: LavitForConditionalGeneration, processor: LavitProcessor, output_dir: str, base_model: str | None = None) -> None:
    """Saves model, processor, remote code (`auto_map` for AutoConfig, AutoModel, AutoModelForImageTextToText and
    AutoProcessor) and a model card to `output_dir`."""
    os.makedirs(output_dir, exist_ok=True)
    type(model.config).register_for_auto_class()
    type(model).register_for_auto_class("AutoModelForImageTextToText")
    type(processor).register_for_auto_class("AutoProcessor")
    model.save_pretrained(output_dir)
    processor.save_pretrained(output_dir)
    # A second auto class for the same model class, so AutoModel works too.
    config = LavitConfig.from_pretrained(output_dir)
    config.auto_map = {**(config.auto_map or {}), "AutoModel": "modeling_lavit.LavitForConditionalGeneration"}
    config.save_pretrained(output_dir)
    card = Path(output_dir) / "README.md"
    if not card.exists():
        card.write_text(_model_card(base_model), encoding="utf-8")


def _model_card(base_model: str | None) -> str:
    base_line = f"base_model: {base_model}\n" if base_model and "/" in base_model and not os.path.isabs(base_model) else ""
    return (
        "---\nlibrary_name: transformers\npipeline_tag: image-text-to-text\n"
        f"{base_line}license: apache-2.0\ntags:\n- lavit\n- qwen2_5_vl\n- latent-visual-reasoning\n---\n\n"
        "# LaViT checkpoint\n\nA Qwen2.5-VL model with K latent visual tokens, a sensory gate and a concept head "
        "(LaViT: Aligning Latent Visual Thoughts for Multi-modal Reasoning). Load it with\n\n"
        "```python\nfrom transformers import AutoModelForImageTextToText, AutoProcessor\n"
        "model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)\n"
        "processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)\n```\n"
    )


def export_to_qwen2_5_vl(lavit_dir: str | os.PathLike, output_dir: str | os.PathLike,
                         force_latent_tokens: bool = True) -> str:
    """Writes a stock Qwen2.5-VL checkpoint from a LaViT checkpoint and returns its path.

    The concept head is dropped (it only serves training) and no remote code is written; the latent tokens stay in
    the tokenizer, and the chat template keeps appending them after the generation prompt, so a server that uses the
    checkpoint's template (vLLM, SGLang) runs the model as it was trained. A checkpoint trained without latent
    tokens (the trainer's `distill=False`: a Naive-SFT baseline, or a teacher fine-tuned that way) is exported with
    `force_latent_tokens=False`, which takes the latent block out of the chat template.
    """
    lavit_dir, output_dir = os.fspath(lavit_dir), os.fspath(output_dir)
    model_type = checkpoint_model_type(lavit_dir)
    if model_type != "lavit":
        raise ValueError(f"{lavit_dir} is a '{model_type}' checkpoint, not a LaViT one; export takes a converted or "
                         "trained LaViT checkpoint (a stock Qwen2.5-VL one is stock already).")
    check_output_dir(output_dir, lavit_dir)
    lavit_config = LavitConfig.from_pretrained(lavit_dir)
    if lavit_config.latent_token_ids is None:
        raise ValueError(f"{lavit_dir} is not a converted LaViT checkpoint (config.latent_token_ids is missing).")
    lavit = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype="auto")
    fields = {
        k: v
        for k, v in lavit.config.to_dict().items()
        if k not in _DROPPED_CONFIG_KEYS and k not in LAVIT_CONFIG_FIELDS
    }
    config = Qwen2_5_VLConfig(**fields)
    config.architectures = ["Qwen2_5_VLForConditionalGeneration"]
    stock = _transplant(lavit, Qwen2_5_VLForConditionalGeneration, config, drop_prefix="concept_head.")
    stock.generation_config = lavit.generation_config
    stock.save_pretrained(output_dir)

    processor = LavitProcessor.from_pretrained(lavit_dir)
    if not force_latent_tokens:
        processor.tokenizer.chat_template = remove_latent_tokens_from_chat_template(processor.tokenizer.chat_template)
    processor.tokenizer.save_pretrained(output_dir)
    processor.image_processor.save_pretrained(output_dir)
    # Stock loaders must not be pointed at LaViT's processor class.
    for name in ("preprocessor_config.json", "tokenizer_config.json"):
        path = Path(output_dir) / name
        if path.exists():
            data = json.loads(path.read_text(encoding="utf-8"))
            data.pop("processor_class", None)
            data.pop("auto_map", None)
            path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return output_dir


__all__ = ["convert_qwen2_5_vl_to_lavit", "export_to_qwen2_5_vl", "save_lavit_checkpoint"]
