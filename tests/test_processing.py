"""LavitProcessor: latent tokens in the generation prompt, the paper's system prompt, prompt/completion form."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from conftest import conversation, noise_image
from processing_lavit import (
    LAVIT_SYSTEM_PROMPT,
    LavitProcessor,
    add_latent_tokens_to_chat_template,
    remove_latent_tokens_from_chat_template,
    set_default_system_prompt,
)


LATENTS = "<v-trace1><v-trace2><v-trace3><v-trace4>"


def test_generation_prompt_ends_with_latents(processor):
    messages = conversation(noise_image(56, 56, 0), "what is this?")
    text = processor.apply_chat_template(messages, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n" + LATENTS)
    assert text.startswith("<|im_start|>system\n" + LAVIT_SYSTEM_PROMPT + "<|im_end|>")
    off = processor.apply_chat_template(messages, add_generation_prompt=True, add_latent_tokens=False)
    assert off.endswith("<|im_start|>assistant\n")
    no_prompt = processor.apply_chat_template(messages)
    assert LATENTS not in no_prompt


def test_attribute_switches_latents_off(processor):
    messages = conversation(noise_image(56, 56, 0), "what is this?")
    processor.add_latent_tokens = False
    try:
        assert processor.apply_chat_template(messages, add_generation_prompt=True).endswith("assistant\n")
    finally:
        processor.add_latent_tokens = True


def test_tokenized_prompt_carries_latent_ids_and_mm_types(processor):
    messages = conversation(noise_image(84, 56, 0), "what is this?")
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    assert inputs["input_ids"][0, -4:].tolist() == processor.latent_token_ids
    assert int(inputs["mm_token_type_ids"].sum()) == 6  # the 2 x 3 image tokens, nothing else
    assert int(inputs["image_grid_thw"].prod() // 4) == 6


def test_tokenizer_carries_the_same_template(lavit_dir, processor):
    tokenizer = AutoTokenizer.from_pretrained(lavit_dir)
    text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=False)
    assert text.endswith("assistant\n" + LATENTS)


def test_prompt_completion_form(processor):
    image = noise_image(56, 56, 0)
    example = processor.to_prompt_completion([image], "what is this?", "a dog")
    assert example["images"] == [image]
    assert example["prompt"][0] == {"role": "system", "content": [{"type": "text", "text": LAVIT_SYSTEM_PROMPT}]}
    assert example["prompt"][1]["content"] == [{"type": "image"}, {"type": "text", "text": "what is this?"}]
    assert example["completion"] == [{"role": "assistant", "content": [{"type": "text", "text": LATENTS + "a dog"}]}]
    naive = processor.to_prompt_completion(image, "what is this?", "a dog", use_latent_tokens=False)
    assert naive["completion"][0]["content"][0]["text"] == "a dog"
    with pytest.raises(ValueError, match="empty answer"):
        processor.to_prompt_completion(image, "what is this?", " ")


# Qwen's published templates write the generation prompt either as plain text or as a Jinja string expression.
PLAIN = "{% for m in messages %}{{ m['content'] }}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
EXPRESSION = "{%- for m in messages %}{{ m['content'] }}{%- endfor %}{%- if add_generation_prompt %}\n    {{- '<|im_start|>assistant\\n' }}\n{%- endif %}"


@pytest.mark.parametrize("template", [PLAIN, EXPRESSION])
def test_latent_hook_in_both_template_styles(template):
    import jinja2

    patched = add_latent_tokens_to_chat_template(template, "<z1><z2>")
    assert add_latent_tokens_to_chat_template(patched, "<z1><z2>") == patched  # idempotent
    render = jinja2.Environment().from_string(patched).render
    messages = [{"content": "hi"}]
    assert render(messages=messages, add_generation_prompt=True).endswith("<|im_start|>assistant\n<z1><z2>")
    assert render(messages=messages, add_generation_prompt=True, add_latent_tokens=False).endswith("assistant\n")
    assert "<z1>" not in render(messages=messages, add_generation_prompt=False)
    assert remove_latent_tokens_from_chat_template(patched) == template  # the exact inverse
    assert remove_latent_tokens_from_chat_template(template) == template


def test_template_without_generation_prompt_is_refused():
    with pytest.raises(ValueError, match="add_generation_prompt"):
        add_latent_tokens_to_chat_template("{{ messages }}", "<z>")
    with pytest.raises(ValueError, match="assistant"):
        add_latent_tokens_to_chat_template("{% if add_generation_prompt %}<|start|>bot{% endif %}", "<z>")


def test_default_system_prompt_replaced():
    assert set_default_system_prompt("x You are a helpful assistant. y", "S") == "x S y"


def test_tokenizer_without_latent_tokens_is_refused(tiny_base_dir):
    from transformers import AutoImageProcessor

    with pytest.raises(ValueError, match=r"no latent tokens \['<v-trace1>'"):
        LavitProcessor(AutoImageProcessor.from_pretrained(tiny_base_dir), AutoTokenizer.from_pretrained(tiny_base_dir))


def test_processor_and_model_must_agree_on_k(lavit_dir, processor):
    from configuration_lavit import LavitConfig

    config = LavitConfig.from_pretrained(lavit_dir)
    processor.check_model(config)  # the saved pair agrees
    six = LavitConfig.from_pretrained(lavit_dir, num_latent_tokens=6, latent_token_ids=config.latent_token_ids + [1, 2])
    with pytest.raises(ValueError, match="expects K=6 latent tokens"):
        processor.check_model(six)
    # A K=6 processor over a tokenizer that holds only 4 latent tokens names the missing ones.
    with pytest.raises(ValueError, match=r"no latent tokens \['<v-trace5>', '<v-trace6>'\]"):
        LavitProcessor(processor.image_processor, processor.tokenizer, num_latent_tokens=6)


def test_loading_the_processor_does_not_warn_about_config_types(lavit_dir):
    """The tokenizer's look-up reads the LaViT config without remote code; its "model of type" warning is noise."""
    import logging

    records = []

    class Collect(logging.Handler):
        def emit(self, record):
            records.append(record.getMessage())

    config_logger = logging.getLogger("transformers.configuration_utils")
    handler = Collect(level=logging.WARNING)
    config_logger.addHandler(handler)
    try:
        LavitProcessor.from_pretrained(lavit_dir)
        assert not [m for m in records if "to instantiate a model of type" in m]
        # the filter lives only as long as the call: the same message from elsewhere still gets through
        config_logger.warning("You are using a model of type `x` to instantiate a model of type ``.")
        assert len(records) == 1
    finally:
        config_logger.removeHandler(handler)
