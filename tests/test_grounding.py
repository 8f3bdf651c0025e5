"""The quickstart teacher's grounding loss (`grounding_lavit`: GroundingCollator, GroundedSFTTrainer)."""

from __future__ import annotations

import pytest
import torch

import synthetic_lavit as task


@pytest.fixture(scope="module")
def grounding_setup(tmp_path_factory):
    """A tiny LaViT checkpoint whose tokenizer was trained on the task's questions, and rows of the size task."""
    from conftest import stock_copy
    from conversion_lavit import convert_qwen2_5_vl_to_lavit
    from modeling_lavit import LavitForConditionalGeneration
    from processing_lavit import LavitProcessor
    from testing_lavit import save_tiny_qwen2_5_vl, tiny_corpus, train_tiny_tokenizer

    samples = task.generate_split(6, seed=11)
    corpus = [task.prompt_of(s) for s in task.generate_split(200, seed=12)] + tiny_corpus(200)
    tokenizer = train_tiny_tokenizer(vocab_size=600, corpus=corpus)
    base = save_tiny_qwen2_5_vl(tmp_path_factory.mktemp("grounding_base"), seed=4, tokenizer=tokenizer)
    path = convert_qwen2_5_vl_to_lavit(base, tmp_path_factory.mktemp("grounding_lavit"), teacher_hidden_size=16)
    rows = [{"image": s["image"], "question": task.prompt_of(s), "answer": s["answer"], "box": s["box"]}
            for s in samples]
    model = LavitForConditionalGeneration.from_pretrained(path).eval()
    return model, LavitProcessor.from_pretrained(path), rows, samples, stock_copy


def test_grounding_collator_points_at_the_colour_word_and_the_key_cell(grounding_setup):
    from grounding_lavit import GroundingCollator

    _, processor, rows, samples, _ = grounding_setup
    batch = GroundingCollator(processor)(rows)
    tokenizer = processor.tokenizer
    for b, sample in enumerate(samples):
        word = tokenizer.decode([int(batch["input_ids"][b, batch["grounding_query"][b, 0]])]).strip()
        assert word == sample["objects"][0].color
        x1, y1, x2, y2 = sample["box"]  # the key object lies wholly inside one 28-pixel cell of the 4 x 4 grid
        expected = torch.zeros(16)
        expected[(y1 // 28) * 4 + x1 // 28] = 1.0
        assert torch.equal(batch["grounding_target"][b], expected)


def test_grounding_loss_reads_the_attention_eager_attention_computes(grounding_setup, tmp_path):
    from grounding_lavit import GroundedSFTTrainer, GroundingCollator
    from trainer_lavit import LavitSFTConfig

    model, processor, rows, _, stock_copy = grounding_setup
    batch = GroundingCollator(processor)(rows)
    config = LavitSFTConfig(str(tmp_path), use_cpu=True, distill=False, report_to="none", max_steps=1,
                            activation_checkpointing=False)
    from datasets import Dataset

    columns = Dataset.from_list([{"image": None, "question": r["question"], "answer": r["answer"]} for r in rows])
    trainer = GroundedSFTTrainer(model=model, args=config, processing_class=processor, grounding_weight=0.5,
                                 train_dataset=columns)
    inputs = {k: v for k, v in batch.items()}
    target = inputs["grounding_target"].clone()
    query = inputs["grounding_query"][:, 0].clone()
    with torch.no_grad():
        loss = trainer.compute_loss(model, dict(inputs))
        without_target = {k: v for k, v in inputs.items() if k != "grounding_target"}
        _, attention, _ = trainer.grounding_attention(model, without_target)
        eager = stock_copy(model, "eager")
        plain = {k: v for k, v in inputs.items() if not k.startswith("grounding_") and k != "labels"}
        out = eager(**plain, output_attentions=True)
        labels_out = eager(**plain, labels=inputs["labels"])
    image = inputs["input_ids"] == model.config.image_token_id
    expected = torch.stack([out.attentions[0][b, :, query[b]].mean(0)[image[b]] for b in range(len(rows))])
    expected = expected / expected.sum(-1, keepdim=True)
    assert torch.allclose(attention, expected, atol=1e-5)
    kl = (target * (target.clamp_min(1e-30).log() - expected.log())).where(target > 0, torch.tensor(0.0)).sum(-1).mean()
    assert torch.allclose(loss, labels_out.loss + 0.5 * kl, atol=1e-4)
    assert trainer._metrics["train" if model.training else "eval"]["ntp_loss"][-1] == pytest.approx(
        labels_out.loss.item(), abs=1e-4)
    # the term trains the first layer's queries and keys through the captured attention
    model.zero_grad()
    _, attention, mask = trainer.grounding_attention(model, {k: v for k, v in inputs.items() if k != "grounding_target"})
    (-(target * attention.clamp_min(1e-8).log()).sum(-1).mean()).backward()
    attention_layer = model.model.language_model.layers[0].self_attn
    assert attention_layer.q_proj.weight.grad.abs().sum() > 0 and attention_layer.k_proj.weight.grad.abs().sum() > 0


def test_grounding_loss_refuses_questions_it_cannot_ground(grounding_setup):
    from grounding_lavit import GroundingCollator

    _, processor, rows, _, _ = grounding_setup
    collator = GroundingCollator(processor)
    with pytest.raises(ValueError, match="names no object.*teacher-grounding-weight 0"):
        collator([dict(rows[0], question="How many squares are there?")])
    with pytest.raises(ValueError, match="tokens for this tokenizer.*train the tokenizer"):
        collator([dict(rows[0], question=rows[0]["question"].replace("the " + rows[0]["question"].split("the ")[2]
                                                                           .split()[0], "the zyxwvutq"))])
