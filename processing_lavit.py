# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""The LaViT processor: Qwen2.5-VL's image processor and tokenizer, plus the latent tokens.

This file is remote code: it imports only `transformers` and its own relative modules.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import AutoProcessor, Qwen2_5_VLProcessor
from transformers.utils import logging


try:  # loaded as remote code from a checkpoint, where the files form a package
    from .configuration_lavit import LATENT_TOKEN_TEMPLATE, LavitConfig, latent_token_strings
except ImportError:  # imported from the repository root
    from configuration_lavit import LATENT_TOKEN_TEMPLATE, LavitConfig, latent_token_strings


logger = logging.get_logger(__name__)

# Paper, appendix C.3.
LAVIT_SYSTEM_PROMPT = (
    "You are an expert multimodal large language model. You process visual information through specialized latent "
    "tokens to ensure precise alignment between visual perception and textual reasoning."
)
QWEN_DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
# The template variable that switches the latent block of the generation prompt on and off.
LATENT_SWITCH = "add_latent_tokens"
_LATENT_HOOK_MARK = "{# lavit-latent-tokens #}"


def add_latent_tokens_to_chat_template(chat_template: str, latent_string: str) -> str:
    """Returns `chat_template` whose generation prompt ends with `latent_string` unless the template variable
    `add_latent_tokens` is false.

    The block is inserted right after the `<|im_start|>assistant` line that `add_generation_prompt` emits, written
    either as plain template text or as a Jinja string expression, as Qwen's templates do. Since the hook lives in
    the template itself, any server that renders the checkpoint's chat template (vLLM, SGLang) forces the latent
    tokens too. A template that already has the hook is returned unchanged.
    """
    if _LATENT_HOOK_MARK in chat_template:
        return chat_template
    hook = (
        f"{_LATENT_HOOK_MARK}{{% if {LATENT_SWITCH} is not defined or {LATENT_SWITCH} %}}{latent_string}{{% endif %}}"
    )
    start = chat_template.rfind("add_generation_prompt")
    if start < 0:
        raise ValueError(
            "The chat template has no `add_generation_prompt` branch, so LaViT cannot place its latent tokens at the "
            "start of the answer; pass a Qwen2.5-VL chat template (processor.chat_template=...)."
        )
    header = re.compile(r"<\|im_start\|>assistant(\n|\\n)")
    match = header.search(chat_template, start)
    if match is None:
        raise ValueError(
            "The chat template's generation prompt does not open an '<|im_start|>assistant' turn; LaViT needs a "
            "Qwen2.5-VL chat template to place its latent tokens (processor.chat_template=...)."
        )
    if match.group(1) == "\n":  # plain template text: insert right after the newline
        cut = match.end()
    else:  # inside a Jinja expression such as {{- '<|im_start|>assistant\n' }}: insert after the expression
        close = chat_template.find("}}", match.end())
        if close < 0:
            raise ValueError("Could not parse the chat template's generation prompt; pass a Qwen2.5-VL chat template.")
        cut = close + 2
    return chat_template[:cut] + hook + chat_template[cut:]


def remove_latent_tokens_from_chat_template(chat_template: str) -> str:
    """Undoes `add_latent_tokens_to_chat_template`: the generation prompt no longer forces the latent tokens (for a
    checkpoint trained without them, such as a Naive-SFT baseline or a teacher fine-tuned that way). A template
    without the hook is returned unchanged."""
    pattern = re.compile(
        re.escape(_LATENT_HOOK_MARK) + r"\{% if " + re.escape(LATENT_SWITCH) + r" is not defined or "
        + re.escape(LATENT_SWITCH) + r" %\}.*?\{% endif %\}",
        re.S,
    )
    return pattern.sub("", chat_template, count=1)


def set_default_system_prompt(chat_template: str, system_prompt: str) -> str:
    """Replaces Qwen's default system prompt in `chat_template` by `system_prompt` (the paper's, C.3, by default).

    Only the default, used when a conversation has no system turn, changes; a system turn given in the
    conversation is always used as is.
    """
    if QWEN_DEFAULT_SYSTEM_PROMPT in chat_template:
        return chat_template.replace(QWEN_DEFAULT_SYSTEM_PROMPT, system_prompt)
    if system_prompt not in chat_template:
        logger.warning(
            "The chat template has no default system prompt to replace; conversations without a system turn will "
            "not get LaViT's system prompt. Pass it as a system turn (LavitProcessor.to_prompt_completion does)."
        )
    return chat_template


def _drop_config_type_warning(record) -> bool:
    return "to instantiate a model of type ``" not in record.getMessage()


class LavitBaseProcessor(Qwen2_5_VLProcessor):
    r"""
    Qwen2.5-VL's processor for images and text only: no video processor, so no torchvision is needed. It serves
    stock Qwen2.5-VL checkpoints (the teacher, a baseline) here; [`LavitProcessor`] adds the latent tokens.

    Args:
        image_processor (`Qwen2VLImageProcessorPil` or `Qwen2VLImageProcessor`): the image processor.
        tokenizer (`Qwen2Tokenizer`): the tokenizer.
        chat_template (`str`, *optional*): the chat template; defaults to the tokenizer's.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template: str | None = None, **kwargs):
        if tokenizer is None:
            raise ValueError(f"{type(self).__name__} needs a tokenizer.")
        chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        super().__init__(image_processor, tokenizer, video_processor=None, chat_template=chat_template, **kwargs)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """Loads a saved processor. The class is already at hand, so the tokenizer's look-up of the model config
        must not stop to ask whether to run a checkpoint's remote code (`trust_remote_code=False` unless given)."""
        kwargs.setdefault("trust_remote_code", False)
        # Without remote code the tokenizer's look-up reads the LaViT config as a bare PreTrainedConfig and warns
        # that the types differ; only the tokenizer class is read from it, so that one message is dropped.
        config_logger = logging.get_logger("transformers.configuration_utils")
        config_logger.addFilter(_drop_config_type_warning)
        try:
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        finally:
            config_logger.removeFilter(_drop_config_type_warning)


class LavitProcessor(LavitBaseProcessor):
    r"""
    Processor of LaViT: Qwen2.5-VL's image processor (the torchvision-free `Qwen2VLImageProcessorPil` works) and
    tokenizer, for images only (no video), aware of the K latent tokens.

    `apply_chat_template(..., add_generation_prompt=True)` ends the prompt with the K latent tokens, so a LaViT model
    always writes its latent visual thoughts before the answer; pass `add_latent_tokens=False` (or set the attribute)
    to leave them out. [`~LavitProcessor.to_prompt_completion`] gives the prompt/completion form the trainer uses.

    Args:
        image_processor (`Qwen2VLImageProcessorPil` or `Qwen2VLImageProcessor`):
            The image processor.
        tokenizer (`Qwen2Tokenizer`):
            The tokenizer; it must contain the K latent tokens (`convert_qwen2_5_vl_to_lavit` adds them).
        chat_template (`str`, *optional*):
            The chat template; defaults to the tokenizer's. The latent-token hook and the default system prompt are
            put into it.
        num_latent_tokens (`int`, *optional*, defaults to 4):
            K, the number of latent tokens.
        latent_token_template (`str`, *optional*, defaults to `"<v-trace{index}>"`):
            How the latent tokens are spelled, `{index}` from 1 to K.
        add_latent_tokens (`bool`, *optional*, defaults to `True`):
            Whether `apply_chat_template` appends the latent tokens after the generation prompt.
        system_prompt (`str`, *optional*, defaults to the paper's system prompt, appendix C.3):
            The system prompt used when a conversation has none.
    """

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        chat_template: str | None = None,
        num_latent_tokens: int = 4,
        latent_token_template: str = LATENT_TOKEN_TEMPLATE,
        add_latent_tokens: bool = True,
        system_prompt: str = LAVIT_SYSTEM_PROMPT,
        **kwargs,
    ):
        if tokenizer is None:
            raise ValueError("LavitProcessor needs a tokenizer.")
        if num_latent_tokens < 1:
            raise ValueError(f"num_latent_tokens must be at least 1, got {num_latent_tokens}.")
        self.num_latent_tokens = num_latent_tokens
        self.latent_token_template = latent_token_template
        self.add_latent_tokens = add_latent_tokens
        self.system_prompt = system_prompt
        self.latent_tokens = latent_token_strings(num_latent_tokens, latent_token_template)
        self.latent_token_ids = latent_token_ids_of(tokenizer, self.latent_tokens)

        chat_template = chat_template if chat_template is not None else tokenizer.chat_template
        if chat_template is not None:
            chat_template = set_default_system_prompt(chat_template, system_prompt)
            chat_template = add_latent_tokens_to_chat_template(chat_template, self.latent_string)
            # The tokenizer carries the same template, so AutoTokenizer users and servers force the latents too.
            tokenizer.chat_template = chat_template
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`ProcessorMixin.save_pretrained`, always with `processing_lavit.py` (and the configuration it imports) and
        an `auto_map` naming it, however the class was imported, so `AutoProcessor` loads the folder in a fresh
        process."""
        type(self).register_for_auto_class("AutoProcessor")
        return super().save_pretrained(save_directory, *args, **kwargs)

    @property
    def latent_string(self) -> str:
        """The K latent tokens written out, e.g. `'<v-trace1><v-trace2><v-trace3><v-trace4>'`."""
        return "".join(self.latent_tokens)

    def check_model(self, config) -> None:
        """Raises a `ValueError` unless this processor's latent tokens are the ones `config` (a `LavitConfig`)
        expects: same K, same ids, in order."""
        expected = getattr(config, "latent_token_ids", None)
        if expected is None:
            raise ValueError(
                "The model's config has no latent_token_ids: it is not a converted LaViT checkpoint. Convert it with "
                "convert_qwen2_5_vl_to_lavit (examples/convert_qwen2_5_vl.py)."
            )
        if config.num_latent_tokens != self.num_latent_tokens or list(expected) != list(self.latent_token_ids):
            size = len(self.tokenizer)
            known = [self.tokenizer.convert_ids_to_tokens(int(i)) if 0 <= int(i) < size else None for i in expected]
            raise ValueError(
                f"The model expects K={config.num_latent_tokens} latent tokens with ids {list(expected)}, which this "
                f"tokenizer reads as {known} (None: not in its vocabulary of {size}), but the processor's latent "
                f"tokens are K={self.num_latent_tokens} ({self.latent_tokens}, ids {self.latent_token_ids}). Load "
                "the processor saved with the model (AutoProcessor.from_pretrained(model_path))."
            )

    def apply_chat_template(self, conversation, *args, add_latent_tokens: bool | None = None, **kwargs):
        """Qwen2.5-VL's `apply_chat_template`; with `add_generation_prompt=True` the prompt ends with the latent
        tokens unless `add_latent_tokens=False` (default: the processor's `add_latent_tokens` attribute)."""
        if add_latent_tokens is None:
            add_latent_tokens = self.add_latent_tokens
        return super().apply_chat_template(conversation, *args, **{LATENT_SWITCH: add_latent_tokens}, **kwargs)

    def to_prompt_completion(
        self,
        images: list[Any] | Any,
        question: str,
        answer: str,
        use_latent_tokens: bool = True,
        system_prompt: str | None = None,
    ) -> dict[str, Any]:
        """Turns `(images, question, answer)` into TRL's conversational prompt/completion form.

        The prompt is a system turn (the paper's prompt by default) and a user turn with one image placeholder per
        image followed by the question; the completion is the assistant turn, led by the K latent tokens when
        `use_latent_tokens` (the LaViT student) and the plain answer otherwise (the Naive-SFT baseline).

        Returns:
            `dict` with `prompt` (list of messages), `completion` (list of messages) and `images` (list).
        """
        images = list(images) if isinstance(images, (list, tuple)) else [images]
        if not question or not question.strip():
            raise ValueError("to_prompt_completion got an empty question.")
        if answer is None or not str(answer).strip():
            raise ValueError(f"to_prompt_completion got an empty answer for the question {question!r}.")
        completion_text = (self.latent_string if use_latent_tokens else "") + str(answer)
        return {
            "prompt": [
                {"role": "system", "content": [{"type": "text", "text": system_prompt or self.system_prompt}]},
                user_turn(question, len(images)),
            ],
            "completion": [{"role": "assistant", "content": [{"type": "text", "text": completion_text}]}],
            "images": images,
        }


def user_turn(text: str, num_images: int = 1) -> dict[str, Any]:
    """A user's chat turn: `num_images` image placeholders, then the text (the order Qwen2.5-VL is trained on)."""
    return {"role": "user", "content": [{"type": "image"} for _ in range(num_images)] + [{"type": "text", "text": text}]}


def latent_token_ids_of(tokenizer, latent_tokens: list[str]) -> list[int]:
    """The ids of `latent_tokens` in `tokenizer`, each one a single special token; raises a `ValueError` naming the
    missing ones otherwise."""
    vocab = tokenizer.get_vocab()
    missing = [token for token in latent_tokens if token not in vocab]
    if missing:
        raise ValueError(
            f"The tokenizer has no latent tokens {missing}. Convert the checkpoint with convert_qwen2_5_vl_to_lavit "
            "(examples/convert_qwen2_5_vl.py), which adds them, or load the tokenizer of a LaViT checkpoint."
        )
    return [vocab[token] for token in latent_tokens]


# The Auto class a converted checkpoint's auto_map names, registered on import (see configuration_lavit).
AutoProcessor.register(LavitConfig, LavitProcessor, exist_ok=True)


__all__ = ["LavitBaseProcessor", "LavitProcessor", "LAVIT_SYSTEM_PROMPT", "user_turn"]
