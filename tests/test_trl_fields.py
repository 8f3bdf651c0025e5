"""LavitSFTTrainer behaves as TRL's SFTTrainer: each SFTConfig/TrainingArguments field gives the loss, batch and
metrics stock SFTTrainer gives on the same weights with distillation off, or is refused before the first step naming
the field; every saved checkpoint loads in a fresh offline process; the bare model refuses what would cut L_traj."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForVisionLanguageModeling

from conftest import TEACHER_WIDTH
from lavit15k_fixture import lavit15k_dataset
from modeling_lavit import LavitForConditionalGeneration
from trainer_lavit import LavitDataCollator, LavitSFTConfig, LavitSFTTrainer

BASE = dict(use_cpu=True, max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3, logging_steps=1,
            report_to="none", seed=0, dataloader_num_workers=0, save_strategy="no")


def trl_batch(processor, rows, **collator_fields):
    """TRL's own vision collator on the prompt/completion form of the rows (Naive SFT: no latent tokens)."""
    template = copy.copy(processor)
    template.add_latent_tokens = False
    collator = DataCollatorForVisionLanguageModeling(processor=template, **collator_fields)
    examples = [processor.to_prompt_completion([row["image"]], row["question"], row["answer"], use_latent_tokens=False)
                for row in rows]
    return collator(examples)


FIELDS = [
    ({}, {}),
    ({"loss_type": "dft"}, {}),
    ({"label_smoothing_factor": 0.1}, {}),
    ({"completion_only_loss": False}, {}),
    ({}, {"compute_loss_func": lambda outputs, labels, num_items_in_batch=None: outputs.logits.float().mean() + 1}),
]


@pytest.mark.parametrize("fields, trainer_kwargs", FIELDS, ids=["defaults", "dft", "label_smoothing",
                                                                 "completion_only_loss_false", "compute_loss_func"])
def test_each_field_gives_stock_trl_loss_batch_and_metrics(lavit_dir, processor, tmp_path, fields, trainer_kwargs):
    dataset = lavit15k_dataset(4, TEACHER_WIDTH)
    rows = [dataset[i] for i in range(2)]
    lavit_model = LavitForConditionalGeneration.from_pretrained(lavit_dir).train()
    lavit = LavitSFTTrainer(model=lavit_model, args=LavitSFTConfig(str(tmp_path / "lavit"), distill=False,
                                                                   **BASE, **fields),
                            train_dataset=dataset, processing_class=processor, **trainer_kwargs)
    batch = lavit.data_collator(rows)
    reference = trl_batch(processor, rows, completion_only_loss=fields.get("completion_only_loss", True) is not False)
    assert sorted(batch) == sorted(reference)
    for key in reference:
        assert torch.equal(batch[key], reference[key]), key
    stock_model = LavitForConditionalGeneration.from_pretrained(lavit_dir).train()  # the same weights
    stock = SFTTrainer(model=stock_model, args=SFTConfig(str(tmp_path / "stock"), remove_unused_columns=False,
                                                         **BASE, **fields),
                       train_dataset=dataset, processing_class=processor,
                       data_collator=lambda rows_: trl_batch(processor, rows_), **trainer_kwargs)
    got = lavit.compute_loss(lavit_model, dict(batch))
    expected = stock.compute_loss(stock_model, dict(reference))
    assert got.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-6)
    default = LavitSFTTrainer(model=lavit_model, args=LavitSFTConfig(str(tmp_path / "plain"), distill=False, **BASE),
                              train_dataset=dataset, processing_class=processor)
    if fields or trainer_kwargs:  # the field changed the loss (it was not accepted and ignored)
        assert default.compute_loss(lavit_model, dict(default.data_collator(rows))).item() != pytest.approx(got.item())
    for key in ("entropy", "mean_token_accuracy", "num_tokens"):
        assert lavit._metrics["train"][key] == pytest.approx(stock._metrics["train"][key], rel=1e-5), key


def test_trl_metrics_are_logged_beside_lavits(lavit_dir, processor, tmp_path):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    trainer = LavitSFTTrainer(model=model, args=LavitSFTConfig(str(tmp_path), gate_warmup_steps=1, **BASE),
                              train_dataset=lavit15k_dataset(4, TEACHER_WIDTH), processing_class=processor)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    for entry in logged:
        assert {"entropy", "mean_token_accuracy", "num_tokens", "ntp_loss", "trajectory_loss", "concept_loss"} <= set(
            entry)
        assert 0 <= entry["mean_token_accuracy"] <= 1 and entry["entropy"] > 0
    assert logged[1]["num_tokens"] > logged[0]["num_tokens"] > 0


def test_compute_metrics_receives_logits(lavit_dir, processor, tmp_path):
    seen = {}

    def metrics(prediction):
        seen["shape"] = prediction.predictions.shape
        seen["labels"] = prediction.label_ids.shape
        return {"seen": 1.0}

    dataset = lavit15k_dataset(4, TEACHER_WIDTH)
    trainer = LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                              args=LavitSFTConfig(str(tmp_path), prediction_loss_only=False,
                                                  per_device_eval_batch_size=2, **BASE),
                              train_dataset=dataset, eval_dataset=dataset, processing_class=processor,
                              compute_metrics=metrics)
    result = trainer.evaluate()
    assert result["eval_seen"] == 1.0 and "eval_loss" in result
    assert seen["shape"][0] == 4 and seen["shape"][-1] == trainer.model.config.text_config.vocab_size
    assert seen["labels"][0] == 4


def test_pad_to_multiple_of_is_honoured(lavit_dir, processor, tmp_path):
    dataset = lavit15k_dataset(4, TEACHER_WIDTH)
    rows = [dataset[i] for i in range(2)]
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir).train()
    padded = LavitSFTTrainer(model=model, args=LavitSFTConfig(str(tmp_path / "p"), pad_to_multiple_of=64, **BASE),
                             train_dataset=dataset, processing_class=processor)
    plain = LavitSFTTrainer(model=model, args=LavitSFTConfig(str(tmp_path / "u"), **BASE), train_dataset=dataset,
                            processing_class=processor)
    wide, narrow = padded.data_collator(rows), plain.data_collator(rows)
    assert wide["input_ids"].shape[1] % 64 == 0 and wide["input_ids"].shape[1] > narrow["input_ids"].shape[1]
    width = narrow["input_ids"].shape[1]
    assert torch.equal(wide["labels"][:, width:], torch.full_like(wide["labels"][:, width:], -100))
    assert not wide["attention_mask"][:, width:].any()
    model.set_sensory_gate(0.5)
    assert padded.compute_loss(model, dict(wide)).item() == pytest.approx(plain.compute_loss(model, dict(narrow)).item(),
                                                                          rel=1e-5)


def test_chat_template_path_is_the_template_trained_and_saved(lavit_dir, processor, tmp_path):
    template_file = tmp_path / "template.jinja"
    original = processor.tokenizer.chat_template  # LaViT's, with its hook; a user's file has none
    from processing_lavit import remove_latent_tokens_from_chat_template

    template_file.write_text(remove_latent_tokens_from_chat_template(original).replace("<|vision_start|>",
                                                                                       "user MARK<|vision_start|>"))
    own = copy.deepcopy(processor)
    dataset = lavit15k_dataset(2, TEACHER_WIDTH)
    trainer = LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                              args=LavitSFTConfig(str(tmp_path / "run"), chat_template_path=str(template_file), **BASE),
                              train_dataset=dataset, processing_class=own)
    batch = trainer.data_collator([dataset[0]])
    text = own.tokenizer.decode(batch["input_ids"][0])
    assert "user MARK" in text and own.latent_string in text  # the new template, the latent block kept
    trainer.save_model(str(tmp_path / "saved"))
    saved = json.loads((tmp_path / "saved" / "chat_template.json").read_text())["chat_template"] if (
        tmp_path / "saved" / "chat_template.json").exists() else (tmp_path / "saved" / "chat_template.jinja").read_text()
    assert "user MARK" in saved and own.latent_string in saved
    with pytest.raises(ValueError, match="chat_template_path='Qwen/Qwen2.5-VL-3B-Instruct'.*jinja"):
        LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                        args=LavitSFTConfig(str(tmp_path / "r2"), chat_template_path="Qwen/Qwen2.5-VL-3B-Instruct",
                                            **BASE), train_dataset=dataset, processing_class=copy.deepcopy(processor))


def test_max_length_names_itself_and_counts_cut_answers(processor):
    dataset = lavit15k_dataset(3, TEACHER_WIDTH)
    rows = [dataset[0], dataset[2]]  # 2 x 3 and 3 x 2 grids: the same prompt length
    full = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)(rows)
    length = int(full["attention_mask"][0].sum())
    ends = [int(torch.isin(ids, torch.tensor(processor.latent_token_ids)).nonzero()[-1]) + 1 for ids in full["input_ids"]]
    assert ends[0] == ends[1]
    latent_end = ends[0]
    with pytest.raises(ValueError, match=rf"max_length={latent_end - 1} cuts through its image and latent block, which "
                                         rf"end at token {latent_end}"):
        LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH, max_length=latent_end - 1)(rows)
    collator = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH, max_length=latent_end + 1)
    cut = collator(rows)
    assert cut["input_ids"].shape[1] == latent_end + 1 and collator.truncated_samples == 2
    assert torch.equal(cut["input_ids"], full["input_ids"][:, : latent_end + 1])
    assert length > latent_end + 1


@pytest.mark.parametrize("strategy", ["group_by_length", "batch_rebalance"])
def test_length_reading_samplers_are_refused(lavit_dir, processor, tmp_path, strategy):
    with pytest.raises(ValueError, match=f"train_sampling_strategy='{strategy}' reads each sample's token length"):
        LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                        args=LavitSFTConfig(str(tmp_path), train_sampling_strategy=strategy, **BASE),
                        train_dataset=lavit15k_dataset(2, TEACHER_WIDTH), processing_class=processor)


def test_another_attention_implementation_is_refused_before_training(lavit_dir, processor, tmp_path):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir, attn_implementation="eager")
    with pytest.raises(ValueError, match="runs the text attention 'eager'.*enable_lavit_attention"):
        LavitSFTTrainer(model=model, args=LavitSFTConfig(str(tmp_path), **BASE),
                        train_dataset=lavit15k_dataset(2, TEACHER_WIDTH), processing_class=processor)


def test_bare_model_with_reentrant_checkpointing_refuses_latent_attention(lavit_dir, processor):
    rows = [lavit15k_dataset(2, TEACHER_WIDTH)[i] for i in range(2)]
    batch = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)(rows)
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir).train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    with pytest.raises(ValueError, match="Reentrant activation checkpointing"):
        model(**batch)
    model.eval()
    with torch.no_grad():
        model(**{k: v for k, v in batch.items() if not k.startswith("teacher_")})  # inference is unaffected
    model.train()
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model(**batch).trajectory_loss.backward()  # non-reentrant: L_traj reaches the weights
    assert model.model.language_model.layers[0].self_attn.q_proj.weight.grad is not None


LOAD = textwrap.dedent(
    """
    import sys
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor
    path = sys.argv[1]
    model = AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert type(model).__name__ == "LavitForConditionalGeneration", type(model)
    assert type(processor).__name__ == "LavitProcessor", type(processor)
    print("loaded", model.config.num_latent_tokens)
    """
)


def test_every_save_of_the_imported_class_loads_in_a_fresh_process(lavit_dir, processor, tmp_path):
    """save_pretrained, Trainer.save_model, a checkpoint written during training, and a merged LoRA model: each
    folder gets the remote code its auto_map names, so a fresh offline process in another directory loads it."""
    from peft import get_peft_model

    from trainer_lavit import lavit_lora_config

    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    model.save_pretrained(tmp_path / "saved")
    processor.save_pretrained(tmp_path / "saved")
    trainer = LavitSFTTrainer(model=model, args=LavitSFTConfig(str(tmp_path / "run"), **{**BASE, "save_steps": 2,
                                                                                         "save_strategy": "steps"}),
                              train_dataset=lavit15k_dataset(4, TEACHER_WIDTH), processing_class=processor)
    trainer.train()
    trainer.save_model(str(tmp_path / "trained"))
    lora = get_peft_model(LavitForConditionalGeneration.from_pretrained(lavit_dir), lavit_lora_config(model, r=4))
    lora.merge_and_unload().save_pretrained(tmp_path / "merged")
    processor.save_pretrained(tmp_path / "merged")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_MODULES_CACHE": str(tmp_path / "modules"), "PYTHONPATH": ""}
    for folder in ("saved", "trained", "run/checkpoint-2", "merged"):
        path = tmp_path / folder
        for name in ("configuration_lavit.py", "modeling_lavit.py", "processing_lavit.py"):
            assert (path / name).is_file(), (folder, name)
        auto_map = json.loads((path / "config.json").read_text())["auto_map"]
        assert auto_map["AutoModelForImageTextToText"] == "modeling_lavit.LavitForConditionalGeneration"
        done = subprocess.run([sys.executable, "-c", LOAD, str(path)], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 0 and "loaded 4" in done.stdout, (folder, done.stderr[-3000:])
