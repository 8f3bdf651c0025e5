"""LaViT called the way transformers' own model tests call a model (issue: "behaves as transformers expects"), each
result compared with the stock Qwen2.5-VL class on the same weights. Covered so far: tuple outputs
(`return_dict=False`) and the deprecated `past_key_values` name."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import QUESTIONS, batch_inputs, stock_copy
from modeling_lavit import LavitForConditionalGeneration, padded_positions


def padded_image_mask(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    return padded_positions(input_ids == image_token_id)[1]


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


def write_latent_tokens_itself(model, inputs) -> int:
    """Makes `model` write its first latent token itself: that token's output row becomes 8 times the row of the
    token greedy decoding picks first, so it wins that step by far. (Converted checkpoints suppress the latent ids
    in generation; the tests lift that with suppress_tokens=[], as a user or a draft model may.) Returns the id."""
    with torch.no_grad():
        chosen = model.generate(**inputs, max_new_tokens=1, do_sample=False)[0, -1]
        weight = model.lm_head.weight
        latent = model.config.latent_token_ids[0]
        weight[latent] = 8 * weight[chosen]
    return latent


DECODING = {
    "greedy": dict(do_sample=False),
    "sampling": dict(do_sample=True, temperature=0.3, top_k=0, top_p=1.0),  # random weights: flat logits
    "beam": dict(do_sample=False, num_beams=2, early_stopping=True, length_penalty=1.0),
}


@pytest.mark.parametrize("decoding", sorted(DECODING))
def test_decoding_with_and_without_a_cache_equals_stock(lavit_model, processor, two_images, decoding):
    """Greedy, seeded sampling and beam search, each with and without a KV cache, over prompts where the model
    writes latent tokens itself: LaViT's tokens equal the stock class's on the same weights."""
    inputs = batch_inputs(processor, two_images, padding_side="left")
    latent = write_latent_tokens_itself(lavit_model, inputs)
    stock = stock_copy(lavit_model)
    settings = dict(max_new_tokens=6, suppress_tokens=[], pad_token_id=processor.tokenizer.pad_token_id,
                    **DECODING[decoding])
    results = {}
    with torch.no_grad():
        for name, model in (("stock", stock), ("lavit", lavit_model)):
            for use_cache in (True, False):
                torch.manual_seed(0)
                results[name, use_cache] = model.generate(**inputs, use_cache=use_cache, **settings)
    expected = results["stock", True]
    assert (expected[:, inputs["input_ids"].shape[1]:] == latent).any()  # the case the issue found
    for key, tokens in results.items():
        assert torch.equal(tokens, expected), key


def test_assisted_decoding_with_a_draft_that_proposes_latent_tokens_equals_greedy(lavit_dir, processor, two_images):
    """Speculative decoding: a LaViT draft that writes latent tokens proposes them, LaViT verifies the candidates in
    one pass, and the result is LaViT's own greedy output (equal to the stock class's)."""
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir).eval()
    draft = LavitForConditionalGeneration.from_pretrained(lavit_dir).eval()
    inputs = batch_inputs(processor, two_images[:1], questions=QUESTIONS[:1])  # assisted decoding takes one sample
    latent = write_latent_tokens_itself(draft, inputs)
    draft.generation_config.suppress_tokens = []
    seen = []
    model.register_forward_pre_hook(lambda module, args, kwargs: seen.append(kwargs["input_ids"]), with_kwargs=True)
    settings = dict(max_new_tokens=8, do_sample=False, suppress_tokens=[])
    with torch.no_grad():
        greedy = model.generate(**inputs, **settings)
        expected = stock_copy(model).generate(**inputs, **settings)
        seen.clear()
        assisted = model.generate(**inputs, assistant_model=draft, **settings)
    assert any((ids == latent).any() for ids in seen[1:])  # candidates holding latent tokens were verified
    assert torch.equal(assisted, greedy) and torch.equal(greedy, expected)


def test_a_left_padded_batch_generates_what_its_samples_generate_one_by_one(lavit_model, processor, two_images):
    """Two prompts of different lengths (different image sizes and questions), each with its latent block."""
    batch = batch_inputs(processor, two_images, padding_side="left")
    assert (batch["attention_mask"][:, 0] == 0).any()  # one sample is padded
    settings = dict(max_new_tokens=6, do_sample=False, min_new_tokens=6)
    width = batch["input_ids"].shape[1]
    with torch.no_grad():
        together = lavit_model.generate(**batch, **settings)[:, width:]
        last_together = lavit_model(**batch).logits[:, -1]
        for i in range(2):
            alone_inputs = batch_inputs(processor, two_images[i:i + 1], questions=QUESTIONS[i:i + 1])
            alone = lavit_model.generate(**alone_inputs, **settings)[:, alone_inputs["input_ids"].shape[1]:]
            assert torch.equal(together[i], alone[0]), i
            assert torch.allclose(last_together[i], lavit_model(**alone_inputs).logits[0, -1], atol=1e-5), i


# ----------------------------------------------------------------------------------------------------------------
# torch.compile. The tests trace with dynamo and AOTAutograd (backend "aot_eager", which checks the graphs and the
# autograd through them without inductor's code generation, minutes on 2 cores); benchmarks/bench_compile.py runs
# inductor.
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def text_only(inputs: dict, image_token_id: int) -> dict:
    """The prompt's tokens without an image (image tokens replaced by an ordinary id): what the stock class compiles
    into one graph too; its vision tower's window index is data-dependent."""
    ids = torch.where(inputs["input_ids"] == image_token_id, 5, inputs["input_ids"])
    return {"input_ids": ids, "attention_mask": inputs["attention_mask"]}


def test_the_plain_inference_forward_compiles_into_one_graph(lavit_model, processor, two_images, fresh_dynamo):
    stock = stock_copy(lavit_model)
    inputs = text_only(batch_inputs(processor, two_images), lavit_model.config.image_token_id)
    with torch.no_grad():
        eager = lavit_model(**inputs)
        expected = stock(**inputs).logits
        compiled = torch.compile(lavit_model, fullgraph=True, backend="aot_eager")(**inputs)
    assert eager.concept_embeds is not None  # eager finds the latent block by its values...
    assert compiled.concept_embeds is None  # ...a traced graph cannot: no latent outputs unless asked (documented)
    assert torch.allclose(compiled.logits, eager.logits, atol=1e-5)
    assert torch.allclose(compiled.logits, expected, atol=1e-5)


@pytest.mark.parametrize(
    "setting, named",
    [
        ({"gate": 0.5}, "a sensory gate below 1 (gamma = 0.5)"),
        ({"output_latent_states": True}, "output_latent_states=True"),
        ({"output_latent_attention": True}, "output_latent_attention=True"),
        ({"latent_intervention": "zeroed"}, "latent_intervention='zeroed'"),
    ],
)
def test_what_one_graph_cannot_hold_is_refused_by_name(lavit_model, processor, two_images, fresh_dynamo, setting,
                                                       named):
    inputs = text_only(batch_inputs(processor, two_images), lavit_model.config.image_token_id)
    setting = dict(setting)
    if "gate" in setting:
        lavit_model.set_sensory_gate(setting.pop("gate"))
    compiled = torch.compile(lavit_model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception) as caught, torch.no_grad():
        compiled(**inputs, **setting)
    message = str(caught.value)
    assert named in message and "fullgraph=True" in message


def test_the_training_forward_compiled_with_graph_breaks_equals_eager(lavit_model, processor, two_images,
                                                                      fresh_dynamo):
    """Gate below 1, latent attention and both losses: graph breaks where the latent and image positions are read;
    losses, outputs and gradients as in eager mode."""
    lavit_model.train()
    inputs = batch_inputs(processor, two_images)
    labels = inputs["input_ids"].clone()
    lavit_model.set_sensory_gate(0.3)
    generator = torch.Generator().manual_seed(0)
    semantics = torch.randn(2, lavit_model.config.teacher_hidden_size, generator=generator)
    n_image = int((inputs["input_ids"] == lavit_model.config.image_token_id).sum(1).max())
    trajectory = torch.rand(2, n_image, generator=generator)
    image_mask = padded_image_mask(inputs["input_ids"], lavit_model.config.image_token_id)
    trajectory = (trajectory * image_mask) / (trajectory * image_mask).sum(1, keepdim=True)

    def step(model):
        lavit_model.zero_grad(set_to_none=True)
        out = model(**inputs, labels=labels, teacher_semantics=semantics, teacher_trajectory=trajectory)
        (out.loss + out.concept_loss + out.trajectory_loss).backward()
        grads = {n: p.grad.clone() for n, p in lavit_model.named_parameters() if p.grad is not None}
        return out, grads

    eager, eager_grads = step(lavit_model)
    compiled, compiled_grads = step(torch.compile(lavit_model, backend="aot_eager"))
    for name in ("loss", "concept_loss", "trajectory_loss", "logits", "latent_image_attention", "concept_embeds"):
        assert torch.allclose(getattr(compiled, name), getattr(eager, name), atol=1e-5), name
    assert compiled.sensory_gate == eager.sensory_gate
    assert eager_grads.keys() == compiled_grads.keys() and "concept_head.fc1.weight" in eager_grads
    for name, grad in eager_grads.items():
        assert torch.allclose(compiled_grads[name], grad, atol=1e-5), name


def test_the_auto_classes_know_lavit_once_the_package_is_imported(lavit_dir):
    """Without trust_remote_code or a checkpoint's auto_map: the Auto mappings themselves hold the LaViT classes."""
    from transformers import AutoConfig, AutoModelForImageTextToText, AutoProcessor
    from transformers.models.auto.modeling_auto import MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING

    from configuration_lavit import LavitConfig
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor

    config = LavitConfig.from_pretrained(lavit_dir)
    assert type(AutoConfig.for_model("lavit")) is LavitConfig
    assert MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING[LavitConfig] is LavitForConditionalGeneration
    model = AutoModelForImageTextToText.from_config(config)
    assert type(model) is LavitForConditionalGeneration
    assert model.config.latent_token_ids == config.latent_token_ids
    # a checkpoint loads through the mappings without running its remote code
    loaded = AutoModelForImageTextToText.from_pretrained(lavit_dir, trust_remote_code=False)
    assert type(loaded) is LavitForConditionalGeneration
    assert type(AutoProcessor.from_pretrained(lavit_dir, trust_remote_code=False)) is LavitProcessor


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_and_load_round_trip(lavit_dir, processor, two_images, tmp_path, dtype):
    """Loaded in a dtype (as a user does: a cast with .to() would also round the rotary frequencies), saved, and
    loaded again with dtype="auto": the same tensors, configuration and outputs, bit for bit."""
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir, dtype=dtype).eval()
    model.set_sensory_gate(0.25)  # not saved: a loaded model starts with the gate open
    model.save_pretrained(tmp_path)
    loaded = LavitForConditionalGeneration.from_pretrained(tmp_path, dtype="auto").eval()
    expected_state, state = model.state_dict(), loaded.state_dict()
    assert expected_state.keys() == state.keys()
    for name, tensor in expected_state.items():
        assert state[name].dtype == dtype and torch.equal(state[name], tensor), name
    assert float(loaded.sensory_gate) == 1.0 and loaded.config.text_config._attn_implementation == "lavit_sdpa"
    for field in ("latent_token_ids", "teacher_hidden_size", "latent_attention_layers", "gate_scope"):
        assert getattr(loaded.config, field) == getattr(model.config, field), field
    inputs = batch_inputs(processor, two_images)
    inputs["pixel_values"] = inputs["pixel_values"].to(dtype)
    with torch.no_grad():
        gated = model(**inputs, output_latent_attention=True)
        loaded.set_sensory_gate(0.25)
        out = loaded(**inputs, output_latent_attention=True)
    assert out.logits.dtype == dtype
    for name in ("logits", "concept_embeds", "latent_image_attention"):
        assert torch.equal(getattr(out, name), getattr(gated, name)), name


def test_resize_token_embeddings_keeps_the_latent_rows(lavit_model, processor, two_images, tmp_path):
    ids = lavit_model.config.latent_token_ids
    old_size = lavit_model.get_input_embeddings().weight.shape[0]
    rows_in = lavit_model.get_input_embeddings().weight[ids].clone()
    rows_out = lavit_model.lm_head.weight[ids].clone()
    inputs = batch_inputs(processor, two_images)
    with torch.no_grad():
        before = lavit_model(**inputs)
        lavit_model.resize_token_embeddings(old_size + 10, pad_to_multiple_of=8)
        after = lavit_model(**inputs)
    assert lavit_model.get_input_embeddings().weight.shape[0] == old_size + 10 + (-(old_size + 10)) % 8
    assert torch.equal(lavit_model.get_input_embeddings().weight[ids], rows_in)
    assert torch.equal(lavit_model.lm_head.weight[ids], rows_out)
    assert torch.allclose(after.logits[..., :old_size], before.logits, atol=1e-6)
    assert torch.allclose(after.concept_embeds, before.concept_embeds, atol=1e-6)
    lavit_model.save_pretrained(tmp_path)
    loaded = LavitForConditionalGeneration.from_pretrained(tmp_path)
    assert torch.equal(loaded.get_input_embeddings().weight, lavit_model.get_input_embeddings().weight)
    # a size that cuts the latent rows is refused, naming them
    with pytest.raises(ValueError, match=r"would drop the rows of the latent tokens .* keep at least 522 rows"):
        loaded.resize_token_embeddings(min(ids) + 1)
    assert loaded.get_input_embeddings().weight.shape[0] > max(ids)
