"""Bad input gets a clear error naming the problem and the fix."""

from __future__ import annotations

import pytest
import torch

from conftest import QUESTIONS, batch_inputs, noise_image
from modeling_lavit import LavitForConditionalGeneration, find_latent_tokens


def test_gate_outside_unit_interval(lavit_model, processor, two_images):
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
            lavit_model.set_sensory_gate(bad)
    lavit_model.sensory_gate.fill_(2.0)  # written behind the setter's back
    with pytest.raises(ValueError, match="outside \\[0, 1\\]; set it with model.set_sensory_gate"):
        lavit_model(**batch_inputs(processor, two_images))


def test_checkpoint_without_latent_tokens(tiny_base_dir, processor, two_images):
    model = LavitForConditionalGeneration.from_pretrained(tiny_base_dir)
    inputs = batch_inputs(processor, two_images)
    inputs["input_ids"] = inputs["input_ids"].clamp_max(model.config.text_config.vocab_size - 1)
    with pytest.raises(ValueError, match="latent_token_ids is not set.*convert_qwen2_5_vl_to_lavit"):
        model(**inputs)


def test_latent_outputs_for_sample_without_latent_tokens(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images, add_latent_tokens=False)
    with torch.no_grad():
        out = lavit_model(**inputs)  # not requested: fine, nothing latent returned
    assert out.latent_hidden_states is None and out.concept_embeds is None
    with pytest.raises(ValueError, match="sample 0 has no latent tokens"):
        lavit_model(**inputs, output_latent_states=True)
    with pytest.raises(ValueError, match="sample 0 has no latent tokens"):
        lavit_model(**inputs, output_latent_attention=True)
    lavit_model.set_sensory_gate(0.5)
    with pytest.raises(ValueError, match="sample 0 has no latent tokens"):
        lavit_model(**inputs)


def test_mixed_batch_is_refused(lavit_model, processor, two_images):
    with_latents = batch_inputs(processor, two_images)
    ids = with_latents["input_ids"].clone()
    latent_index, _ = find_latent_tokens(ids, lavit_model.config.latent_token_ids)
    ids[1, latent_index[1]] = processor.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    lavit_model.set_sensory_gate(0.5)  # training: the gate is closing
    with pytest.raises(ValueError, match="(?i)sample 1 has no latent tokens"):
        lavit_model(**{**with_latents, "input_ids": ids})
    lavit_model.set_sensory_gate(1.0)
    with pytest.raises(ValueError, match="sample 1 has no latent tokens"):
        lavit_model(**{**with_latents, "input_ids": ids}, output_latent_states=True)
    with pytest.raises(ValueError, match="Sample 1 has no latent tokens while others in the batch do"):
        lavit_model(**{**with_latents, "input_ids": ids}, latent_intervention="zeroed")
    with torch.no_grad():  # plain inference: no latent outputs, no error
        assert lavit_model(**{**with_latents, "input_ids": ids}).concept_embeds is None


def test_malformed_latent_block(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    ids = inputs["input_ids"].clone()
    latent_index, _ = find_latent_tokens(ids, lavit_model.config.latent_token_ids)
    ids[0, latent_index[0, 0]], ids[0, latent_index[0, 1]] = ids[0, latent_index[0, 1]].item(), ids[0, latent_index[0, 0]].item()
    for requested in (dict(output_latent_states=True), dict(output_latent_attention=True),
                      dict(latent_intervention="zeroed")):
        with pytest.raises(ValueError, match="Sample 0 has a malformed latent block"):
            lavit_model(**{**inputs, "input_ids": ids}, **requested)
    lavit_model.set_sensory_gate(0.5)
    with pytest.raises(ValueError, match="Sample 0 has a malformed latent block"):
        lavit_model(**{**inputs, "input_ids": ids})
    lavit_model.set_sensory_gate(1.0)
    with torch.no_grad():  # plain inference: the batch has no latent outputs, and no error
        assert lavit_model(**{**inputs, "input_ids": ids}).concept_embeds is None
    # the search itself: a swapped block counts as absent when not strict
    index, present = find_latent_tokens(ids, lavit_model.config.latent_token_ids, strict=False)
    assert present.tolist() == [False, True] and index[0].tolist() == [0, 0, 0, 0]
    assert torch.equal(index[1], find_latent_tokens(ids[1:], lavit_model.config.latent_token_ids)[0][0])


def test_latent_attention_for_sample_without_image(lavit_model, processor):
    messages = [[{"role": "user", "content": [{"type": "text", "text": q}]}] for q in QUESTIONS]
    processor.tokenizer.padding_side = "right"
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt", processor_kwargs={"padding": True})
    with torch.no_grad():
        out = lavit_model(**inputs)
    assert out.concept_embeds is not None  # latent states need no image
    with pytest.raises(ValueError, match="sample 0 has no image"):
        lavit_model(**inputs, output_latent_attention=True)


def test_two_images_with_latent_attention_is_unsupported(lavit_model, processor):
    images = [noise_image(56, 56, 3), noise_image(56, 84, 4)]
    messages = [{"role": "user", "content": [{"type": "image", "image": images[0]}, {"type": "image", "image": images[1]},
                                              {"type": "text", "text": "which is brighter?"}]}]
    inputs = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True,
                                           return_tensors="pt")
    with torch.no_grad():
        lavit_model(**inputs)  # plain forward and latent states are fine with two images
    with pytest.raises(ValueError, match="2 images: latent attention over several images is unsupported"):
        lavit_model(**inputs, output_latent_attention=True)


def test_inputs_embeds_without_ids(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images[:1], QUESTIONS[:1])
    with pytest.raises(ValueError, match="pass input_ids"):
        lavit_model(inputs_embeds=torch.zeros(1, 5, lavit_model.config.text_config.hidden_size), output_latent_states=True)


def test_gate_on_other_attention_implementation(lavit_dir, processor, two_images):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir, attn_implementation="eager")
    inputs = batch_inputs(processor, two_images)
    with torch.no_grad():
        model(**inputs)  # the open gate needs nothing special
    model.set_sensory_gate(0.5)
    with pytest.raises(ValueError, match="needs the text attention 'lavit_sdpa'.*runs 'eager'"):
        model(**inputs)


def test_pixels_without_mm_token_type_ids(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    inputs.pop("mm_token_type_ids")
    with pytest.raises(ValueError, match="without mm_token_type_ids.*a collator must keep it"):
        lavit_model(**inputs)


def test_latent_token_ids_the_tokenizer_does_not_know(lavit_dir, processor):
    """A model whose config names other latent ids than the processor's tokenizer holds (same K): refused by the
    check the trainer, the evaluation and the lmms-eval wrapper run first, naming what the tokenizer reads there."""
    from configuration_lavit import LavitConfig

    ordinary = LavitConfig.from_pretrained(lavit_dir, latent_token_ids=[40, 41, 42, 43])
    words = processor.tokenizer.convert_ids_to_tokens([40, 41, 42, 43])
    with pytest.raises(ValueError, match=r"ids \[40, 41, 42, 43\], which this tokenizer reads as ") as caught:
        processor.check_model(ordinary)
    assert str(words) in str(caught.value) and "AutoProcessor.from_pretrained(model_path)" in str(caught.value)
    vocab = len(processor.tokenizer)
    beyond = LavitConfig.from_pretrained(lavit_dir, latent_token_ids=[1, 2, 3, vocab + 5], vocab_size=vocab + 10)
    with pytest.raises(ValueError, match=rf"None: not in its vocabulary of {vocab}"):
        processor.check_model(beyond)
