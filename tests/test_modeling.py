"""LavitForConditionalGeneration against a stock Qwen2.5-VL carrying the same weights, and against eager attention."""

from __future__ import annotations

import math

import pytest
import torch

from conftest import QUESTIONS, TEACHER_WIDTH, batch_inputs, conversation, noise_image, stock_copy
from modeling_lavit import (
    AttentionCapture,
    LavitAttentionControl,
    concept_loss,
    enable_lavit_attention,
    find_latent_tokens,
    padded_positions,
    trajectory_loss,
)


def eager_attentions(stock_eager, inputs):
    with torch.no_grad():
        out = stock_eager(**inputs, output_attentions=True)
    return out.attentions  # tuple over layers of (B, H, L, L)


def image_and_latent_positions(model, input_ids):
    image_index, image_mask = padded_positions(input_ids == model.config.image_token_id)
    latent_index, present = find_latent_tokens(input_ids, model.config.latent_token_ids)
    assert bool(present.all())
    return image_index, image_mask, latent_index


def test_open_gate_matches_stock_model(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    stock = stock_copy(lavit_model, "sdpa")
    with torch.no_grad():
        ours = lavit_model(**inputs, output_latent_attention=True)
        ref = stock(**inputs)
    assert ours.sensory_gate == 1.0
    assert (ours.logits - ref.logits).abs().max().item() <= 1e-5
    assert ours.latent_hidden_states.shape == (2, 4, lavit_model.config.text_config.hidden_size)
    assert ours.concept_embeds.shape == (2, TEACHER_WIDTH)


def test_loaded_gate_is_open_and_attention_is_lavit(lavit_model):
    assert float(lavit_model.sensory_gate) == 1.0
    assert lavit_model.config.text_config._attn_implementation == "lavit_sdpa"
    assert lavit_model.config.vision_config._attn_implementation == "sdpa"
    assert "sensory_gate" not in lavit_model.state_dict()


def _gated_rows(model, inputs):
    """The rows the 'after_image' gate restrains, computed here from the token layout."""
    ids = inputs["input_ids"]
    is_image = ids == model.config.image_token_id
    is_latent = torch.isin(ids, torch.tensor(model.config.latent_token_ids))
    after_image = is_image.cumsum(1) > 0
    return after_image & ~is_image & ~is_latent & inputs["attention_mask"].bool()


def test_gate_closed_form_in_first_layer(lavit_model, processor, two_images):
    """Equation 4 exactly: with the open-gate image mass m of a gated row (per head), the gated mass is
    gamma*m / (gamma*m + 1 - m); latent rows keep their open-gate attention."""
    gamma = 1e-6
    inputs = batch_inputs(processor, two_images)
    ids = inputs["input_ids"]
    batch, length = ids.shape
    open_attention = eager_attentions(stock_copy(lavit_model, "eager"), inputs)[0].double()  # (B, H, L, L)

    all_rows = torch.arange(length).expand(batch, length)
    capture = AttentionCapture(all_rows, all_rows, layers=[0], average_heads=False)
    lavit_model.set_sensory_gate(gamma)
    gated_rows = lavit_model._gated_queries(
        ids, inputs["attention_mask"], ids == lavit_model.config.image_token_id, find_latent_tokens(ids, lavit_model.config.latent_token_ids)[0]
    )
    assert torch.equal(gated_rows, _gated_rows(lavit_model, inputs))
    control = LavitAttentionControl(math.log(gamma), gated_rows, ids == lavit_model.config.image_token_id, capture)
    with torch.no_grad():
        lavit_model(**inputs, lavit_control=control)
    gated_attention = capture.per_layer[0].double()  # (B, H, L, L)

    is_image = (ids == lavit_model.config.image_token_id)[:, None, :].double()  # (B, 1, L)
    m = (open_attention * is_image[:, :, None, :]).sum(-1)  # (B, H, L)
    expected = gamma * m / (gamma * m + 1 - m)
    got = (gated_attention * is_image[:, :, None, :]).sum(-1)
    rows = gated_rows[:, None, :].expand_as(m)
    assert rows.sum() > 20
    assert (got[rows] - expected[rows]).abs().max().item() <= 1e-6
    # The gate really bites: open-gate masses are far from the gated ones.
    assert (m[rows] - got[rows]).abs().max().item() > 0.05

    latent_index = find_latent_tokens(ids, lavit_model.config.latent_token_ids)[0]
    for b in range(batch):
        rows_b = latent_index[b]
        assert (gated_attention[b][:, rows_b] - open_attention[b][:, rows_b]).abs().max().item() <= 1e-6


def _additive_gate_mask(model, inputs, log_gate):
    """An independent 4D float mask: causal, padding and ln(gamma) on gated rows x image columns."""
    ids, attention = inputs["input_ids"], inputs["attention_mask"].bool()
    batch, length = ids.shape
    allowed = torch.ones(length, length, dtype=torch.bool).tril()[None] & attention[:, None, :]  # (B, L, L)
    block = _gated_rows(model, inputs)[:, :, None] & (ids == model.config.image_token_id)[:, None, :]
    mask = torch.zeros(batch, 1, length, length)
    mask = mask.masked_fill(block[:, None], log_gate)
    return mask.masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)


@pytest.mark.parametrize("gamma", [1e-6, 0.3, 0.0])
def test_gated_logits_match_eager_with_hand_built_mask(lavit_model, processor, two_images, gamma):
    inputs = batch_inputs(processor, two_images)
    stock = stock_copy(lavit_model, "eager")
    log_gate = math.log(gamma) if gamma > 0 else float("-inf")
    position_ids, _ = stock.model.get_rope_index(
        inputs["input_ids"],
        image_grid_thw=inputs["image_grid_thw"],
        attention_mask=inputs["attention_mask"],
        mm_token_type_ids=inputs["mm_token_type_ids"],
    )
    reference_inputs = {k: v for k, v in inputs.items() if k != "attention_mask"}
    with torch.no_grad():
        ref = stock(**reference_inputs, attention_mask=_additive_gate_mask(lavit_model, inputs, log_gate), position_ids=position_ids)
        lavit_model.set_sensory_gate(gamma)
        ours = lavit_model(**inputs)
    valid = inputs["attention_mask"].bool()
    assert torch.isfinite(ours.logits).all()
    assert (ours.logits[valid] - ref.logits[valid]).abs().max().item() <= 1e-5
    assert math.isclose(ours.sensory_gate, gamma, rel_tol=1e-6)


def test_hard_gate_cuts_image_mass_to_zero(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    ids = inputs["input_ids"]
    lavit_model.set_sensory_gate(0.0)
    rows, _ = padded_positions(_gated_rows(lavit_model, inputs))
    image_index, image_mask = padded_positions(ids == lavit_model.config.image_token_id)
    capture = AttentionCapture(rows, image_index, key_mask=image_mask)
    image_keys = ids == lavit_model.config.image_token_id
    control = LavitAttentionControl(float("-inf"), _gated_rows(lavit_model, inputs), image_keys, capture)
    with torch.no_grad():
        out = lavit_model(**inputs, lavit_control=control)
    assert torch.isfinite(out.logits).all()
    for layer in range(lavit_model.config.text_config.num_hidden_layers):
        assert capture.per_layer[layer].abs().max().item() == 0.0


def reference_latent_attention(model, inputs, layers):
    """Latent-token image attention from eager `output_attentions`: heads and layers averaged, renormalised."""
    attentions = eager_attentions(stock_copy(model, "eager"), inputs)
    ids = inputs["input_ids"]
    image_index, image_mask, latent_index = image_and_latent_positions(model, ids)
    results = []
    for b in range(ids.shape[0]):
        cols = image_index[b][image_mask[b]]
        per_layer = [attentions[l][b][:, latent_index[b]][:, :, cols].double().mean(0) for l in layers]  # (K, N_b)
        a = torch.stack(per_layer).mean(0)
        results.append(a / a.sum(-1, keepdim=True))
    return results


@pytest.mark.parametrize("layers", ["all", [1], "last", "last_half"])
def test_latent_image_attention_matches_eager(lavit_dir, processor, two_images, layers):
    from modeling_lavit import LavitForConditionalGeneration

    model = LavitForConditionalGeneration.from_pretrained(lavit_dir, latent_attention_layers=layers).eval()
    inputs = batch_inputs(processor, two_images)
    with torch.no_grad():
        out = model(**inputs, output_latent_attention=True)
    depth = model.config.text_config.num_hidden_layers
    assert depth >= 2  # so that "last" and "last_half" differ from "all"
    named = {"all": list(range(depth)), "last": [depth - 1], "last_half": list(range(depth // 2, depth))}
    layer_ids = named[layers] if isinstance(layers, str) else layers
    expected = reference_latent_attention(model, inputs, layer_ids)
    assert out.latent_image_attention.shape == (2, 4, int(out.image_token_mask.sum(1).max()))
    for b, ref in enumerate(expected):
        n = int(out.image_token_mask[b].sum())
        assert n == ref.shape[1]
        got = out.latent_image_attention[b]
        assert (got[:, :n].double() - ref).abs().max().item() <= 1e-6
        assert got[:, n:].abs().max().item() == 0.0 if got.shape[1] > n else True
        assert torch.allclose(got.sum(-1), torch.ones(4), atol=1e-6)
    assert out.image_token_mask.tolist()[0].count(True) == 6 and out.image_token_mask.tolist()[1].count(True) == 20


def test_gradients_reach_head_latent_rows_and_attention(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    lavit_model.train()
    lavit_model.set_sensory_gate(1e-6)
    out = lavit_model(**inputs, output_latent_attention=True)
    n = out.latent_image_attention.shape[-1]
    target = torch.zeros_like(out.latent_image_attention)
    target[..., 0] = 1.0
    loss = trajectory_loss(target, out.latent_image_attention, out.image_token_mask)
    loss.backward()
    embed = lavit_model.get_input_embeddings().weight.grad
    latent_ids = lavit_model.config.latent_token_ids
    # Through the trajectory loss alone: the latent embedding rows and every layer's query/key projections.
    assert embed[latent_ids].abs().sum(-1).min().item() > 0
    for layer in lavit_model.model.language_model.layers:
        assert layer.self_attn.q_proj.weight.grad.abs().sum().item() > 0
        assert layer.self_attn.k_proj.weight.grad.abs().sum().item() > 0
    assert lavit_model.concept_head.fc1.weight.grad is None
    lavit_model.zero_grad()
    out = lavit_model(**inputs)
    concept_loss(out.concept_embeds, torch.randn(2, TEACHER_WIDTH)).backward()
    assert lavit_model.concept_head.fc1.weight.grad.abs().sum().item() > 0
    assert lavit_model.concept_head.fc2.weight.grad.abs().sum().item() > 0
    assert lavit_model.get_input_embeddings().weight.grad[latent_ids].abs().sum().item() > 0
    assert n > 0


def test_forward_computes_losses_when_given_targets(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    semantics = torch.randn(2, TEACHER_WIDTH)
    with torch.no_grad():
        plain = lavit_model(**inputs, output_latent_attention=True)
    target = plain.latent_image_attention.clone()
    with torch.no_grad():
        out = lavit_model(**inputs, teacher_semantics=semantics, teacher_trajectory=target)
    assert out.trajectory_loss.abs().item() <= 1e-6  # identical distributions
    expected = 1 - torch.nn.functional.cosine_similarity(plain.concept_embeds, semantics).mean()
    assert abs(out.concept_loss.item() - expected.item()) <= 1e-6


@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batch_equals_one_by_one(lavit_model, processor, two_images, padding_side):
    batch = batch_inputs(processor, two_images, padding_side=padding_side)
    lavit_model.set_sensory_gate(1e-3)
    with torch.no_grad():
        together = lavit_model(**batch, output_latent_attention=True)
        for b, image in enumerate(two_images):
            single = batch_inputs(processor, [image], [QUESTIONS[b]])
            alone = lavit_model(**single, output_latent_attention=True)
            valid = batch["attention_mask"][b].bool()
            assert (together.logits[b][valid] - alone.logits[0]).abs().max().item() <= 1e-5
            n = int(together.image_token_mask[b].sum())
            assert (together.latent_image_attention[b, :, :n] - alone.latent_image_attention[0]).abs().max() <= 1e-6
            assert (together.concept_embeds[b] - alone.concept_embeds[0]).abs().max().item() <= 1e-5
            assert (together.latent_hidden_states[b] - alone.latent_hidden_states[0]).abs().max().item() <= 1e-5


def test_generate_after_forced_latents_returns_answer_only(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images, padding_side="left")
    latent_ids = lavit_model.config.latent_token_ids
    assert inputs["input_ids"][:, -4:].tolist() == [latent_ids, latent_ids]
    generated = lavit_model.generate(**inputs, max_new_tokens=12, do_sample=False)
    new_tokens = generated[:, inputs["input_ids"].shape[1] :]
    assert not torch.isin(new_tokens, torch.tensor(latent_ids)).any()
    texts = processor.batch_decode(new_tokens, skip_special_tokens=True)
    assert all("<v-trace" not in text for text in texts)
    # Cached decoding gives the same greedy tokens as recomputing every step without a cache.
    uncached = lavit_model.generate(**inputs, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(generated, uncached)


def test_generate_refuses_closed_gate(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images[:1], QUESTIONS[:1])
    lavit_model.set_sensory_gate(0.5)
    with pytest.raises(ValueError, match="set_sensory_gate\\(1.0\\)"):
        lavit_model.generate(**inputs, max_new_tokens=3, do_sample=False)


def test_capture_works_on_a_stock_teacher(lavit_model, processor, two_images):
    """The same side channel on a stock Qwen2_5_VLForConditionalGeneration (as the teacher extraction uses it)."""
    inputs = batch_inputs(processor, two_images)
    teacher = enable_lavit_attention(stock_copy(lavit_model, "sdpa"))
    ids = inputs["input_ids"]
    rows, row_mask = padded_positions(inputs["attention_mask"].bool() & (ids != lavit_model.config.image_token_id))
    image_index, image_mask = padded_positions(ids == lavit_model.config.image_token_id)
    capture = AttentionCapture(rows, image_index, row_mask, image_mask, reduce_queries=True)
    with torch.no_grad():
        out = teacher(**inputs, lavit_control=LavitAttentionControl(capture=capture))
        plain = stock_copy(lavit_model, "sdpa")(**inputs)
    assert (out.logits - plain.logits).abs().max().item() == 0.0
    attentions = eager_attentions(stock_copy(lavit_model, "eager"), inputs)
    got = capture.mean_over_layers()  # (B, N)
    for b in range(2):
        r = rows[b][row_mask[b]]
        cols = image_index[b][image_mask[b]]
        ref = torch.stack([a[b][:, r][:, :, cols].double().mean(0).mean(0) for a in attentions]).mean(0)
        n = cols.numel()
        assert (got[b, :n].double() - ref).abs().max().item() <= 1e-6


def test_loss_without_logits_equals_the_stock_loss(lavit_model, processor, two_images):
    inputs = batch_inputs(processor, two_images)
    labels = inputs["input_ids"].clone()
    labels[:, :-6] = -100  # the last tokens only, as a completion
    labels[inputs["attention_mask"] == 0] = -100
    with torch.no_grad():
        full = lavit_model(**inputs, labels=labels)
        lean = lavit_model(**inputs, labels=labels, return_logits=False)
        counted = lavit_model(**inputs, labels=labels, return_logits=False, num_items_in_batch=torch.tensor(40))
    assert lean.logits is None
    assert abs(full.loss.item() - lean.loss.item()) <= 1e-5
    n = int((labels[:, 1:] != -100).sum())
    assert abs(counted.loss.item() - lean.loss.item() * n / 40) <= 1e-5
