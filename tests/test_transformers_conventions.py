"""LaViT called the way transformers' own model tests call a model (issue: "behaves as transformers expects"), each
result compared with the stock Qwen2.5-VL class on the same weights. Covered so far: tuple outputs
(`return_dict=False`) and the deprecated `past_key_values` name."""

from __future__ import annotations

import warnings

import torch

from conftest import batch_inputs, stock_copy


def test_return_dict_false_gives_the_tuple_stock_gives(lavit_model, processor, two_images):
    lavit_model.eval()
    stock = stock_copy(lavit_model)
    inputs = batch_inputs(processor, two_images)
    labels = inputs["input_ids"].clone()
    with torch.no_grad():
        as_dict = lavit_model(**inputs, labels=labels)
        as_tuple = lavit_model(**inputs, labels=labels, return_dict=False)
        stock_tuple = stock(**inputs, labels=labels, return_dict=False)
    assert isinstance(as_tuple, tuple) and not isinstance(as_dict, tuple)
    expected = as_dict.to_tuple()
    assert len(as_tuple) == len(expected)
    for got, want in zip(as_tuple[:2], expected[:2]):  # loss, logits
        assert torch.equal(got, want)
    # the same loss and logits as the stock class in its tuple (gate open, nothing latent requested)
    assert torch.allclose(as_tuple[0], stock_tuple[0], atol=1e-5)
    assert torch.allclose(as_tuple[1], stock_tuple[1], atol=1e-5)


def test_return_dict_false_from_the_config_too(lavit_model, processor, two_images):
    # (the stock class itself fails here in the pinned transformers: its inner model returns a tuple too)
    lavit_model.eval()
    inputs = batch_inputs(processor, two_images)
    with torch.no_grad():
        expected = lavit_model(**inputs).logits
        lavit_model.config.return_dict = False
        out = lavit_model(**inputs)
    assert isinstance(out, tuple) and torch.equal(out[0], expected)


def _warnings_of(call) -> list[str]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call()
    return [str(w.message) for w in caught if "past_key_values" in str(w.message)]


def test_the_deprecated_cache_name_warns_as_stock_does(lavit_model, processor, two_images):
    lavit_model.eval()
    stock = stock_copy(lavit_model)
    inputs = batch_inputs(processor, two_images)
    with torch.no_grad():
        stock_warned = _warnings_of(lambda: stock(**inputs, past_key_values=None, use_cache=False))
        lavit_warned = _warnings_of(lambda: lavit_model(**inputs, past_key_values=None, use_cache=False))
    assert stock_warned, "the stock class no longer warns; revisit this test"
    assert lavit_warned == [m.replace("Qwen2_5_VLForConditionalGeneration", "LavitForConditionalGeneration")
                            for m in stock_warned]


def test_a_pass_over_latent_tokens_the_model_wrote_itself_equals_stock(lavit_model, processor, two_images):
    """Without a KV cache every generation step feeds the whole sequence again: if the model wrote `<v-trace1>`
    itself after its latent block, that pass holds a partly repeated block. Plain inference reads it as a sequence
    without latent outputs, as the stock class reads any tokens."""
    lavit_model.eval()
    stock = stock_copy(lavit_model)
    inputs = batch_inputs(processor, two_images)
    first_latent = lavit_model.config.latent_token_ids[0]
    written = torch.full((inputs["input_ids"].shape[0], 1), first_latent)
    longer = {**inputs, "input_ids": torch.cat([inputs["input_ids"], written], 1),
              "attention_mask": torch.cat([inputs["attention_mask"], torch.ones_like(written)], 1),
              "mm_token_type_ids": torch.cat([inputs["mm_token_type_ids"], torch.zeros_like(written)], 1)}
    with torch.no_grad():
        out, expected = lavit_model(**longer), stock(**longer)
    assert out.concept_embeds is None
    assert torch.allclose(out.logits, expected.logits, atol=1e-5)


def test_generation_without_a_cache_equals_generation_with_one(lavit_model, processor, two_images):
    lavit_model.eval()
    inputs = batch_inputs(processor, two_images, padding_side="left")
    # converted checkpoints suppress the latent ids in generation; lift that, as a user or a draft model may, and
    # make the model write the first latent token itself: its output row becomes twice the row of the token greedy
    # decoding picks first, so it wins that step
    settings = dict(max_new_tokens=6, do_sample=False, suppress_tokens=[])
    with torch.no_grad():
        chosen = lavit_model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
        weight = lavit_model.lm_head.weight
        weight[lavit_model.config.latent_token_ids[0]] = 2 * weight[chosen]
        cached = lavit_model.generate(**inputs, use_cache=True, **settings)
        uncached = lavit_model.generate(**inputs, use_cache=False, **settings)
    new = cached[:, inputs["input_ids"].shape[1]:]
    assert (new == lavit_model.config.latent_token_ids[0]).any()  # the case the issue found
    assert torch.equal(cached, uncached)
