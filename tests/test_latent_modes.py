"""Inference-time latent modes: masked (no later query sees the latents, through generation), zeroed, shuffled."""

from __future__ import annotations

import pytest
import torch

from conftest import QUESTIONS, batch_inputs, stock_copy
from modeling_lavit import AttentionCapture, LavitAttentionControl, find_latent_tokens, padded_positions


def with_answer(inputs, processor, text=" the red one"):
    """Appends answer tokens to every (right-padded-free, single) prompt: a teacher-forced continuation."""
    answer = torch.tensor([processor.tokenizer(text).input_ids])
    ids = torch.cat([inputs["input_ids"], answer.expand(inputs["input_ids"].shape[0], -1)], 1)
    out = dict(inputs)
    out["input_ids"] = ids
    out["attention_mask"] = torch.cat([inputs["attention_mask"], torch.ones_like(ids[:, -answer.shape[1]:])], 1)
    out["mm_token_type_ids"] = torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(ids[:, -answer.shape[1]:])], 1)
    return out


def test_masked_mode_leaves_no_mass_on_the_latents(lavit_model, processor, two_images):
    inputs = with_answer(batch_inputs(processor, two_images[:1], QUESTIONS[:1]), processor)
    ids = inputs["input_ids"]
    latent_index, _ = find_latent_tokens(ids, lavit_model.config.latent_token_ids)
    later = torch.arange(int(latent_index[0, -1]) + 1, ids.shape[1])[None]
    capture = AttentionCapture(later, latent_index, average_heads=False)
    with torch.no_grad():
        lavit_model(**inputs, latent_intervention="masked", lavit_control=LavitAttentionControl(capture=capture))
        open_capture = AttentionCapture(later, latent_index)
        lavit_model(**inputs, lavit_control=LavitAttentionControl(capture=open_capture))
    for layer in range(lavit_model.config.text_config.num_hidden_layers):
        assert capture.per_layer[layer].abs().max().item() == 0.0
        assert open_capture.per_layer[layer].sum().item() > 0  # without the mode they do look at the latents


def test_masked_logits_match_eager_with_a_hand_built_mask(lavit_model, processor, two_images):
    inputs = with_answer(batch_inputs(processor, two_images[:1], QUESTIONS[:1]), processor)
    ids = inputs["input_ids"]
    length = ids.shape[1]
    latent = find_latent_tokens(ids, lavit_model.config.latent_token_ids)[0][0]
    mask = torch.zeros(length, length).masked_fill(~torch.ones(length, length, dtype=torch.bool).tril(),
                                                   torch.finfo(torch.float32).min)
    mask[int(latent[-1]) + 1 :, latent] = float("-inf")
    stock = stock_copy(lavit_model, "eager")
    position_ids, _ = stock.model.get_rope_index(ids, image_grid_thw=inputs["image_grid_thw"],
                                                 attention_mask=inputs["attention_mask"],
                                                 mm_token_type_ids=inputs["mm_token_type_ids"])
    with torch.no_grad():
        ref = stock(**{k: v for k, v in inputs.items() if k != "attention_mask"}, attention_mask=mask[None, None],
                    position_ids=position_ids)
        ours = lavit_model(**inputs, latent_intervention="masked")
        forced = lavit_model(**inputs)
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-5
    assert (ours.logits[0, -3:] - forced.logits[0, -3:]).abs().max().item() > 1e-4  # the mode changes the answer


def test_masked_generation_with_cache_equals_without(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images, padding_side="left")
    positions, _ = find_latent_tokens(inputs["input_ids"], lavit_model.config.latent_token_ids)
    kwargs = dict(max_new_tokens=8, do_sample=False, latent_intervention="masked", latent_positions=positions)
    cached = lavit_model.generate(**inputs, **kwargs)
    uncached = lavit_model.generate(**inputs, **kwargs, use_cache=False)
    assert torch.equal(cached, uncached)
    with pytest.raises(ValueError, match="decoding steps need latent_positions"):
        lavit_model.generate(**inputs, max_new_tokens=3, do_sample=False, latent_intervention="masked")


def test_zeroed_mode_zeroes_the_latent_input_embeddings(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    latent_index, _ = find_latent_tokens(inputs["input_ids"], lavit_model.config.latent_token_ids)
    seen = {}

    def record(module, args, kwargs):
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    handle = lavit_model.model.language_model.layers[0].register_forward_pre_hook(record, with_kwargs=True)
    with torch.no_grad():
        lavit_model(**inputs, latent_intervention="zeroed")
    zeroed = seen.pop("x")
    with torch.no_grad():
        lavit_model(**inputs)
    plain = seen.pop("x")
    handle.remove()
    for b in range(2):
        assert zeroed[b, latent_index[b]].abs().max().item() == 0.0
        assert plain[b, latent_index[b]].abs().max().item() > 0
    others = torch.ones(zeroed.shape[:2], dtype=torch.bool).scatter(1, latent_index, False)
    assert torch.equal(zeroed[others], plain[others])


def test_shuffled_mode_swaps_latent_states_between_samples(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    latent_index, _ = find_latent_tokens(inputs["input_ids"], lavit_model.config.latent_token_ids)
    layers = lavit_model.model.language_model.layers
    before, after = {}, {}

    def record_output(module, args, output):
        before[0] = output.clone()

    def record_input(module, args, kwargs):
        after[1] = (args[0] if args else kwargs["hidden_states"]).clone()

    hooks = [layers[0].register_forward_hook(record_output),
             layers[1].register_forward_pre_hook(record_input, with_kwargs=True)]
    with torch.no_grad():
        lavit_model(**inputs, latent_intervention="shuffled")
    for h in hooks:
        h.remove()
    # what enters layer 1 at sample b's latents is what layer 0 produced at sample b + 1's latents
    for b in range(2):
        donor = (b + 1) % 2
        assert torch.equal(after[1][b, latent_index[b]], before[0][donor, latent_index[donor]])
    others = torch.ones(after[1].shape[:2], dtype=torch.bool).scatter(1, latent_index, False)
    assert torch.equal(after[1][others], before[0][others])
    with pytest.raises(ValueError, match="batch of at least 2"):
        lavit_model(**batch_inputs(processor, two_images[:1], QUESTIONS[:1]), latent_intervention="shuffled")


def test_bad_interventions(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    with pytest.raises(ValueError, match="latent_intervention must be one of"):
        lavit_model(**inputs, latent_intervention="dropped")
    lavit_model.set_sensory_gate(0.5)
    with pytest.raises(ValueError, match="inference ablations"):
        lavit_model(**inputs, latent_intervention="masked")
