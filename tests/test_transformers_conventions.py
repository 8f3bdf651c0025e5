"""LaViT called the way transformers' own model tests call a model (issue: "behaves as transformers expects"), each
result compared with the stock Qwen2.5-VL class on the same weights. Covered so far: tuple outputs
(`return_dict=False`) and the deprecated `past_key_values` name."""

from __future__ import annotations

import warnings

import pytest
import torch

from conftest import batch_inputs, stock_copy
from modeling_lavit import padded_positions


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
