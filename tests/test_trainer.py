"""The LaViT trainer: the gate schedule, the losses and target processing on hand-made tensors, training steps of
LaViT and Naive SFT, exact resumption, two CPU processes, LoRA, and every bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import TEACHER_WIDTH
from lavit15k_fixture import lavit15k_dataset, lavit15k_rows, write_lavit15k_folder
from modeling_lavit import LavitForConditionalGeneration, concept_loss, trajectory_loss
from processing_lavit import LavitProcessor
from trainer_lavit import (
    LavitDataCollator,
    LavitSFTConfig,
    LavitSFTTrainer,
    PreprocessingCache,
    SensoryGateCallback,
    lavit_lora_config,
    resize_gaze,
    sensory_gate,
    sparsify_gaze,
    trajectory_target,
)

ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------------------------------------------
# Pure functions
# ---------------------------------------------------------------------------------------------------------------


def test_cosine_gate_follows_equation_5():
    eps, tw = 1e-6, 400
    assert sensory_gate(0, tw, eps) == eps
    assert sensory_gate(200, tw, eps) == pytest.approx(eps + (1 - eps) / 2, abs=1e-15)
    assert sensory_gate(100, tw, eps) == pytest.approx(eps + (1 - eps) / 2 * (1 - math.cos(math.pi / 4)), abs=1e-15)
    assert sensory_gate(399, tw, eps) < 1.0
    assert sensory_gate(400, tw, eps) == 1.0 and sensory_gate(1000, tw, eps) == 1.0


def test_step_and_none_schedules():
    assert [sensory_gate(t, 4, schedule="step") for t in (0, 3, 4, 9)] == [0.0, 0.0, 1.0, 1.0]
    assert [sensory_gate(t, 4, schedule="none") for t in (0, 3, 4)] == [1.0, 1.0, 1.0]
    with pytest.raises(ValueError, match="gate_schedule must be one of"):
        sensory_gate(0, 4, schedule="linear")


def test_concept_loss_hand_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    b = torch.tensor([[1.0, 1.0], [0.0, 5.0]])
    # cosines 1/sqrt(2) and 1: loss = 1 - (1/sqrt(2) + 1) / 2
    assert concept_loss(a, b).item() == pytest.approx(1 - (1 / math.sqrt(2) + 1) / 2, abs=1e-6)
    assert concept_loss(b, b).item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="teacher_hidden_size"):
        concept_loss(a, torch.ones(2, 3))


def test_trajectory_loss_hand_values():
    student = torch.full((1, 2, 4), 0.25)  # K = 2 latent tokens, uniform over 4 image tokens
    assert trajectory_loss(student.clone(), student).item() == pytest.approx(0.0, abs=1e-7)
    target = torch.tensor([[0.5, 0.5, 0.0, 0.0]])  # a top-2 target shared by both latent tokens
    # each latent: 0.5 ln(0.5/0.25) * 2 = ln 2; summed over K = 2
    assert trajectory_loss(target, student).item() == pytest.approx(2 * math.log(2), abs=1e-6)
    batch_target = torch.stack([target[0], torch.tensor([0.25, 0.25, 0.25, 0.25])])
    batch_student = student.expand(2, 2, 4)
    assert trajectory_loss(batch_target, batch_student).item() == pytest.approx(math.log(2), abs=1e-6)  # mean over B


def test_bilinear_resize_2x3_to_4x6():
    gaze = torch.tensor([[1.0, 2.0, 4.0], [3.0, 5.0, 9.0]])
    # align_corners=False doubling: output i samples input (i + 0.5) / 2 - 0.5, clamped to the edges
    def weights(n_in):
        rows = []
        for i in range(2 * n_in):
            x = min(max((i + 0.5) / 2 - 0.5, 0.0), n_in - 1)
            lo = int(math.floor(x))
            hi = min(lo + 1, n_in - 1)
            w = torch.zeros(n_in)
            w[lo] += 1 - (x - lo)
            w[hi] += x - lo
            rows.append(w)
        return torch.stack(rows)

    expected = weights(2) @ gaze @ weights(3).T
    assert expected[0].tolist() == pytest.approx([1.0, 1.25, 1.75, 2.5, 3.5, 4.0])
    got = resize_gaze(gaze.reshape(-1), (2, 3), (4, 6))
    assert got.shape == (4, 6) and torch.allclose(got, expected, atol=1e-6)
    assert torch.equal(resize_gaze(gaze.reshape(-1), (2, 3), (2, 3)), gaze)
    with pytest.raises(ValueError, match="does not fill its 2 x 2 grid"):
        resize_gaze(gaze.reshape(-1), (2, 2), (4, 4))


def test_topk_sparsification_hand_case():
    got = sparsify_gaze(torch.tensor([0.1, 0.5, 0.3, 0.9, 0.2]), top_k=2)
    # min-max: [0, .5, .25, 1, .125]; keep 1.0 and 0.5; normalise: 2/3 and 1/3
    assert got.tolist() == pytest.approx([0.0, 1 / 3, 0.0, 2 / 3, 0.0], abs=1e-6)
    flat = sparsify_gaze(torch.full((6,), 0.2), top_k=3)
    assert torch.allclose(flat, torch.full((6,), 1 / 6))  # uniform over every cell: the first or last are not favoured
    target = trajectory_target(np.arange(6, dtype=np.float32), (2, 3), (4, 6), top_k=8)
    assert target.shape == (24,) and target.sum().item() == pytest.approx(1.0) and int((target > 0).sum()) == 8


def test_gate_callback_sets_the_model(lavit_model):
    callback = SensoryGateCallback(warmup_steps=4)

    class State:
        global_step = 2

    callback.on_step_begin(None, State(), None, model=lavit_model)
    assert float(lavit_model.sensory_gate) == pytest.approx(sensory_gate(2, 4), rel=1e-6)
    callback.on_train_end(None, State(), None, model=lavit_model)
    assert float(lavit_model.sensory_gate) == 1.0


# ---------------------------------------------------------------------------------------------------------------
# The collator
# ---------------------------------------------------------------------------------------------------------------


def test_collator_labels_latents_and_answer_only(lavit_dir, processor):
    rows = lavit15k_rows(3, TEACHER_WIDTH)
    dataset = lavit15k_dataset(3, TEACHER_WIDTH)
    collator = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)
    batch = collator([dataset[i] for i in range(3)])
    latent_ids = processor.latent_token_ids
    for b in range(3):
        labelled = batch["labels"][b][batch["labels"][b] != -100].tolist()
        answer = processor.tokenizer(rows[b]["answer"]).input_ids
        assert labelled[:4] == latent_ids  # the completion starts with the K latent tokens
        assert labelled[4 : 4 + len(answer)] == answer
        assert labelled[-1] == processor.tokenizer.convert_tokens_to_ids("<|im_end|>") or labelled[-2] == \
            processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
        image = batch["input_ids"][b] == processor.image_token_id
        assert (batch["labels"][b][image] == -100).all()
    assert "mm_token_type_ids" in batch and int(batch["mm_token_type_ids"].sum()) == 6 + 20 + 6
    assert batch["teacher_semantics"].shape == (3, TEACHER_WIDTH)
    # gaze_target: the teacher grids equal the student's here (same pixel bounds), so only top-k and normalising act
    assert batch["teacher_trajectory"].shape == (3, 20)
    for b, n in enumerate((6, 20, 6)):
        expected = sparsify_gaze(torch.tensor(rows[b]["gaze"]), 8)
        assert torch.allclose(batch["teacher_trajectory"][b, :n], expected, atol=1e-6)
        assert batch["teacher_trajectory"][b, n:].abs().sum() == 0
    assert torch.allclose(batch["teacher_semantics"], torch.tensor(
        np.stack([np.asarray(r["v_sem_gaze"], dtype=np.float32) for r in rows])))
    naive = LavitDataCollator(processor, distill=False)([dataset[i] for i in range(3)])
    assert "teacher_trajectory" not in naive
    assert not torch.isin(naive["input_ids"], torch.tensor(latent_ids)).any()


@pytest.mark.parametrize(
    "corrupt, message",
    [
        (lambda r: r.update(gaze=r["gaze"][:-1]), r"Sample gqa/0: its gaze has 5 values but its gaze_grid \[2, 3\]"),
        (lambda r: r.update(gaze=[float("nan")] + r["gaze"][1:]), "Sample gqa/0: its gaze holds NaN or inf"),
        (lambda r: r.update(v_sem_gaze=[float("inf")] * TEACHER_WIDTH), "Sample gqa/0: its v_sem_gaze holds NaN or inf"),
        (lambda r: r.update(v_sem_gaze=[0.5] * 32), "V_sem \\(v_sem_gaze\\) has width 32 but the model's concept head"),
    ],
)
def test_collator_names_bad_samples(processor, corrupt, message):
    from PIL import Image
    import io

    row = lavit15k_rows(1, TEACHER_WIDTH)[0]
    row["image"] = Image.open(io.BytesIO(row["image"]["bytes"]))
    corrupt(row)
    with pytest.raises(ValueError, match=message):
        LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)([row])


def assert_batches_equal(got, expected):
    assert sorted(got) == sorted(expected)
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        assert torch.equal(got[key], expected[key]), key


@pytest.mark.parametrize("distill, cut", [(True, False), (False, False), (True, True)])
def test_cached_collation_equals_uncached(processor, distill, cut):
    """Batches assembled from each sample's kept form equal TRL's batch of the same rows: image sizes differ (grids
    2x3, 5x4, 3x2, 4x4), so prompts, images and trajectory targets all pad; a max_length cuts the longest rows'
    answers (just past the longest latent block)."""
    dataset = lavit15k_dataset(8, TEACHER_WIDTH)
    rows = [dataset[i] for i in range(8)]
    max_length = None
    if cut:
        full = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)(rows)
        latent = torch.isin(full["input_ids"], torch.tensor(processor.latent_token_ids))
        max_length = int(latent.nonzero()[:, 1].max()) + 2
    plain = LavitDataCollator(processor, distill=distill, teacher_hidden_size=TEACHER_WIDTH, max_length=max_length)
    cache = PreprocessingCache()
    cached = LavitDataCollator(processor, distill=distill, teacher_hidden_size=TEACHER_WIDTH, max_length=max_length,
                               cache=cache)
    for order in ([0, 1, 2, 3], [4, 5, 1, 0], [3, 1, 6, 7, 2], [0, 1, 2, 3]):
        batch = [rows[i] for i in order]
        assert_batches_equal(cached(batch), plain(batch))
    assert cache.stats()["samples"] == 8 and cache.stats()["misses"] == 8 and cache.stats()["hits"] == 9
    for row in rows:  # each kept form (split from the batch it was first met in) is TRL's batch of the row alone
        assert_batches_equal(cache.entries[cached._sample_key(row)], plain([row]))
    if max_length is not None:
        assert plain([rows[1]])["input_ids"].shape[1] == max_length  # the cut is exercised
    # a batch's tensors are fresh: changing one leaves the cache as it was
    batch = cached(rows[:2])
    batch["input_ids"].zero_()
    assert_batches_equal(cached(rows[:2]), plain(rows[:2]))


def test_cache_tells_samples_and_collators_apart(processor):
    """A sample is known by its content: the same image with another question is another entry; a Naive-SFT collator
    (no latent tokens) and a LaViT one sharing a cache never read each other's entries; past the budget samples are
    processed anew and counted."""
    rows = [lavit15k_dataset(2, TEACHER_WIDTH)[i] for i in range(2)]
    other = dict(rows[0], question="what shape is object 0?")
    cache = PreprocessingCache()
    lavit = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH, cache=cache)
    naive = LavitDataCollator(processor, distill=False, cache=cache)
    plain_lavit = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)
    plain_naive = LavitDataCollator(processor, distill=False)
    assert_batches_equal(lavit([rows[0], other]), plain_lavit([rows[0], other]))
    assert_batches_equal(naive([rows[0], other]), plain_naive([rows[0], other]))
    assert len(cache) == 4
    tiny = PreprocessingCache(max_gb=1e-9)
    collator = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH, cache=tiny)
    assert_batches_equal(collator(rows), plain_lavit(rows))
    assert_batches_equal(collator(rows), plain_lavit(rows))
    assert tiny.stats()["samples"] == 0 and tiny.stats()["over_budget"] == 4
    with pytest.raises(ValueError, match="max_gb must be positive"):
        PreprocessingCache(max_gb=0)


def test_cached_training_equals_uncached(lavit_dir, processor, tmp_path):
    """cache_preprocessing changes where batches come from, not what is trained: the same losses and weights over
    two epochs of a 6-sample dataset (the second served from the cache)."""
    dataset = lavit15k_dataset(6, TEACHER_WIDTH)
    results = []
    for cache in (False, True):
        model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
        trainer = LavitSFTTrainer(model=model, args=tiny_args(tmp_path / str(cache), max_steps=6, save_strategy="no",
                                                              cache_preprocessing=cache),
                                  train_dataset=dataset, processing_class=processor)
        trainer.train()
        results.append(([h["loss"] for h in trainer.state.log_history if "loss" in h], snapshot(model)))
        if cache:
            assert trainer.preprocessing_cache.stats()["samples"] == 6
            assert trainer.preprocessing_cache.stats()["hits"] == 6
    assert results[0][0] == results[1][0]
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in results[0][1])


def test_preprocessing_cache_settings_are_not_ignored(lavit_dir, processor, tmp_path):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    dataset = lavit15k_dataset(2, TEACHER_WIDTH)
    with pytest.raises(ValueError, match="cache_preprocessing is False"):
        LavitSFTTrainer(model=model, args=tiny_args(tmp_path), train_dataset=dataset, processing_class=processor,
                        preprocessing_cache=PreprocessingCache())
    with pytest.raises(ValueError, match="a data_collator without a cache"):
        LavitSFTTrainer(model=model, args=tiny_args(tmp_path, cache_preprocessing=True), train_dataset=dataset,
                        processing_class=processor, data_collator=LavitDataCollator(processor))
    with pytest.raises(ValueError, match=r"cache_preprocessing_max_gb=4.0 differs from the budget of the "
                                         r"preprocessing_cache given \(2 GB\)"):
        LavitSFTTrainer(model=model, args=tiny_args(tmp_path, cache_preprocessing=True), train_dataset=dataset,
                        processing_class=processor, preprocessing_cache=PreprocessingCache(max_gb=2))
    with pytest.raises(ValueError, match="cache_preprocessing_max_gb must be positive"):
        tiny_args(tmp_path, cache_preprocessing=True, cache_preprocessing_max_gb=0)


# ---------------------------------------------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------------------------------------------


def tiny_args(output_dir, **overrides) -> LavitSFTConfig:
    base = dict(use_cpu=True, max_steps=4, per_device_train_batch_size=2, gate_warmup_steps=3, learning_rate=1e-3,
                logging_steps=1, save_steps=2, report_to="none", seed=0, dataloader_num_workers=0)
    return LavitSFTConfig(str(output_dir), **{**base, **overrides})


def snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("distill", [True, False])
def test_a_few_steps_train_log_and_checkpoint(lavit_dir, processor, tmp_path, distill):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    before = snapshot(model)
    trainer = LavitSFTTrainer(model=model, args=tiny_args(tmp_path, distill=distill),
                              train_dataset=lavit15k_dataset(12, TEACHER_WIDTH), processing_class=processor)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 4
    expected = {"loss", "ntp_loss"} | ({"concept_loss", "trajectory_loss", "sensory_gate"} if distill else set())
    for entry in logs:
        assert expected <= set(entry) and all(math.isfinite(entry[k]) for k in expected)
    if distill:
        assert [e["sensory_gate"] for e in logs] == pytest.approx([sensory_gate(t, 3) for t in range(4)], rel=1e-6)
        for entry in logs:
            assert entry["loss"] == pytest.approx(
                entry["ntp_loss"] + 0.3 * (entry["concept_loss"] + entry["trajectory_loss"]), rel=1e-4)
    else:
        assert "sensory_gate" not in logs[0] and "trajectory_loss" not in logs[0]
    after = model.state_dict()
    changed = [k for k in after if not torch.equal(before[k], after[k])]
    assert any(k.startswith("model.language_model.layers") for k in changed)
    assert not any(k.startswith("model.visual") for k in changed)  # the frozen vision tower
    head_changed = any(k.startswith("concept_head") for k in changed)
    assert head_changed == distill
    assert (tmp_path / "checkpoint-2" / "model.safetensors").exists()
    assert (tmp_path / "checkpoint-4" / "trainer_state.json").exists()
    assert float(model.sensory_gate) == 1.0  # open again after training


def test_resume_inside_the_warm_up_reproduces_the_run(lavit_dir, processor, tmp_path):
    dataset = lavit15k_dataset(12, TEACHER_WIDTH)
    full = LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                           args=tiny_args(tmp_path / "full", max_steps=6, gate_warmup_steps=4),
                           train_dataset=dataset, processing_class=processor)
    full.train()
    resumed = LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                              args=tiny_args(tmp_path / "resumed", max_steps=6, gate_warmup_steps=4),
                              train_dataset=dataset, processing_class=processor)
    resumed.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-2"))
    keys = ("loss", "ntp_loss", "concept_loss", "trajectory_loss", "sensory_gate", "learning_rate")
    original = {h["step"]: h for h in full.state.log_history if "loss" in h}
    again = {h["step"]: h for h in resumed.state.log_history if "loss" in h}
    assert sorted(again) == [1, 2, 3, 4, 5, 6]  # steps 1-2 come from the checkpoint's trainer state
    assert again[3]["sensory_gate"] < 1.0  # resumed inside the warm-up
    for step in again:
        for key in keys:
            assert again[step][key] == pytest.approx(original[step][key], rel=1e-6, abs=1e-9), (step, key)


def launch_two_processes(lavit_dir, tmp_path, overrides: dict):
    """tests/ddp_worker.py under a 2-process CPU `accelerate launch`; returns the finished process and its output
    folder."""
    dataset_dir = write_lavit15k_folder(tmp_path / "lavit15k", 16, TEACHER_WIDTH)
    out = tmp_path / "ddp"
    out.mkdir()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
         str(ROOT / "examples" / "accelerate" / "cpu_2proc.yaml"), str(ROOT / "tests" / "ddp_worker.py"),
         lavit_dir, dataset_dir, str(out), json.dumps(overrides)],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    return result, out


@pytest.mark.parametrize(
    "overrides",
    [{}, {"distill": False}, {"trajectory_loss_coef": 0.0}, {"concept_loss_coef": 0.0}, {"gate_schedule": "step"},
     {"gate_schedule": "none"}],
    ids=["lavit", "naive_sft", "no_trajectory", "no_semantic", "no_curriculum", "single_stage"],
)
def test_two_cpu_processes_train_the_same_weights(lavit_dir, tmp_path, overrides):
    """The paper's run, Naive SFT and each Table 3 ablation under DDP with activation checkpointing on (the Trainer
    then runs DDP without looking for unused parameters): 3 steps, the same weights on both ranks."""
    result, out = launch_two_processes(lavit_dir, tmp_path, overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world"] for r in ranks] == [2, 2] and ranks[0]["checkpointing"]
    assert ranks[0]["sha256"] == ranks[1]["sha256"]
    assert len(ranks[0]["losses"]) == 3 and all(math.isfinite(x) for x in ranks[0]["losses"])
    base = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(base.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.to(torch.float32).contiguous().numpy().tobytes())
    assert digest.hexdigest() != ranks[0]["sha256"]  # they trained


@pytest.mark.parametrize(
    "overrides, named",
    [({"distill": False, "ddp_find_unused_parameters": True, "activation_checkpointing_kwargs": {"use_reentrant": True}},
      "ddp_find_unused_parameters=True with reentrant activation checkpointing"),
     ({"distill": False, "unfreeze_concept_head": True}, "are trainable, but no loss reaches them")],
    ids=["find_unused_with_reentrant", "unfrozen_head"],
)
def test_two_processes_refuse_ddp_settings_that_would_stop_training(lavit_dir, tmp_path, overrides, named):
    """Each of these stops DDP at its first or second backward (tried: 'Expected to mark a variable ready only once',
    'Expected to have finished reduction'); the trainer says so, with the fix, before the first step."""
    result, _ = launch_two_processes(lavit_dir, tmp_path, overrides)
    assert result.returncode != 0
    assert named in result.stderr and "RuntimeError: Expected to" not in result.stderr
    assert not (tmp_path / "ddp" / "rank0.json").exists()


def test_the_concept_head_is_frozen_where_no_loss_reaches_it(lavit_dir, processor, tmp_path):
    for overrides, trained in (({}, True), ({"distill": False}, False), ({"concept_loss_coef": 0.0}, False)):
        model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
        LavitSFTTrainer(model=model, args=tiny_args(tmp_path, **overrides), train_dataset=lavit15k_dataset(4, TEACHER_WIDTH),
                        processing_class=processor)
        assert all(p.requires_grad == trained for p in model.concept_head.parameters()), overrides
        assert all(p.requires_grad for p in model.model.language_model.parameters())


def test_lora_saves_reloads_offline_and_merges(lavit_dir, processor, tmp_path):
    from peft import PeftModel

    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    trainer = LavitSFTTrainer(model=model, args=tiny_args(tmp_path / "run", max_steps=2, save_strategy="no"),
                              train_dataset=lavit15k_dataset(8, TEACHER_WIDTH), processing_class=processor,
                              peft_config=lavit_lora_config(model, r=4, lora_alpha=8))
    trainer.train()
    trainer.save_model(str(tmp_path / "adapter"))
    saved = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert "concept_head" in saved["modules_to_save"]
    trained = trainer.model.eval()
    inputs = LavitDataCollator(processor, teacher_hidden_size=TEACHER_WIDTH)([lavit15k_dataset(2, TEACHER_WIDTH)[i] for i in range(2)])
    forward = {k: v for k, v in inputs.items() if k not in ("labels", "teacher_semantics", "teacher_trajectory")}
    with torch.no_grad():
        expected = trained(**forward)
    reloaded = PeftModel.from_pretrained(LavitForConditionalGeneration.from_pretrained(lavit_dir), tmp_path / "adapter")
    merged = reloaded.merge_and_unload().eval()
    assert isinstance(merged, LavitForConditionalGeneration)
    with torch.no_grad():
        got = merged(**forward)
        untouched = LavitForConditionalGeneration.from_pretrained(lavit_dir).eval()
        base_out = untouched(**forward)
    assert (got.logits - expected.logits).abs().max().item() <= 1e-4
    assert (got.concept_embeds - expected.concept_embeds).abs().max().item() <= 1e-5
    assert (got.logits - base_out.logits).abs().max().item() > 1e-4
    latent = processor.latent_token_ids
    assert not torch.equal(merged.get_input_embeddings().weight[latent],
                           untouched.get_input_embeddings().weight[latent])  # the latent rows trained


def test_train_script_with_a_config_file(lavit_dir, tmp_path):
    dataset_dir = write_lavit15k_folder(tmp_path / "lavit15k", 8, TEACHER_WIDTH)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf_home")}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "train_lavit.py"), "--config",
         str(ROOT / "examples" / "configs" / "tiny_cpu.yaml"), "--model_name_or_path", lavit_dir,
         "--dataset_name", dataset_dir, "--output_dir", str(tmp_path / "run"), "--max_steps", "2"],
        env=env, capture_output=True, text=True, timeout=600, cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "run" / "model.safetensors").exists() and (tmp_path / "run" / "processor_config.json").exists()
    state = json.loads((tmp_path / "run" / "checkpoint-2" / "trainer_state.json").read_text())
    assert {"ntp_loss", "concept_loss", "trajectory_loss", "sensory_gate"} <= set(state["log_history"][0])


@pytest.mark.parametrize("name", sorted(p.stem for p in (ROOT / "examples" / "configs").glob("*.yaml")))
def test_every_shipped_config_parses(name):
    from trl import ModelConfig, ScriptArguments, TrlParser

    parser = TrlParser((ScriptArguments, LavitSFTConfig, ModelConfig))
    script, config, model = parser.parse_args_and_config(
        args=["--config", str(ROOT / "examples" / "configs" / f"{name}.yaml"), "--output_dir", "unused",
              "--use_cpu", "true", "--bf16", "false"])
    assert isinstance(config, LavitSFTConfig)
    if name == "lavit_3b":
        assert (config.concept_loss_coef, config.trajectory_loss_coef, config.gate_warmup_steps, config.max_steps) == \
            (0.3, 0.3, 400, 1000)
        assert config.learning_rate == 5e-6 and config.per_device_train_batch_size == 16
    expected = {"naive_sft": ("distill", False), "no_trajectory": ("trajectory_loss_coef", 0.0),
                "no_semantic": ("concept_loss_coef", 0.0), "no_curriculum": ("gate_schedule", "step"),
                "single_stage": ("gate_schedule", "none")}
    if name in expected:
        field, value = expected[name]
        assert getattr(config, field) == value


# ---------------------------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------------------------


def test_distill_needs_teacher_columns(lavit_dir, processor, tmp_path):
    dataset = lavit15k_dataset(4, TEACHER_WIDTH).remove_columns(["gaze", "v_sem_gaze"])
    with pytest.raises(ValueError, match=r"lacks the teacher columns \['gaze', 'v_sem_gaze'\]"):
        LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir), args=tiny_args(tmp_path),
                        train_dataset=dataset, processing_class=processor)
    LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir),
                    args=tiny_args(tmp_path, distill=False), train_dataset=dataset, processing_class=processor)


def test_model_k_must_match_the_data(lavit_dir, tiny_base_dir, processor, tmp_path):
    from conversion_lavit import convert_qwen2_5_vl_to_lavit

    six = convert_qwen2_5_vl_to_lavit(tiny_base_dir, tmp_path / "k6", num_latent_tokens=6,
                                      teacher_hidden_size=TEACHER_WIDTH)
    with pytest.raises(ValueError, match="The model expects K=6 latent tokens"):
        LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(six), args=tiny_args(tmp_path),
                        train_dataset=lavit15k_dataset(4, TEACHER_WIDTH), processing_class=processor)


def test_v_sem_width_must_match_the_head(lavit_dir, processor, tmp_path):
    trainer = LavitSFTTrainer(model=LavitForConditionalGeneration.from_pretrained(lavit_dir), args=tiny_args(tmp_path),
                              train_dataset=lavit15k_dataset(4, 32), processing_class=processor)
    with pytest.raises(ValueError, match="has width 32 but the model's concept head outputs teacher_hidden_size=48"):
        trainer.train()


def test_reentrant_checkpointing_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Reentrant gradient checkpointing"):
        tiny_args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True})
    tiny_args(tmp_path, activation_checkpointing=True, activation_checkpointing_kwargs={"use_reentrant": True},
              distill=False)  # Naive SFT has no side channel to cut


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("concept_loss_coef", -0.1, "concept_loss_coef must be a finite number >= 0"),
        ("gate_schedule", "linear", "gate_schedule must be one of"),
        ("gate_warmup_steps", -1, "gate_warmup_steps must be >= 0"),
        ("gate_epsilon", 0.0, r"gate_epsilon must lie in \(0, 1\)"),
        ("concept_target", "max", "concept_target must be one of"),
        ("trajectory_target_tokens", "first", "trajectory_target_tokens must be one of"),
        ("trajectory_topk", 0, "trajectory_topk must be >= 1"),
        ("remove_unused_columns", True, "remove_unused_columns must be False"),
        ("latent_attention_layers", "middle", "latent_attention_layers must be one of"),
        ("latent_attention_layers", "last_0", "names no layer"),
    ],
)
def test_config_errors(tmp_path, field, value, message):
    with pytest.raises(ValueError, match=message):
        tiny_args(tmp_path, **{field: value})


def test_a_stock_model_is_refused(tiny_base_dir, processor, tmp_path):
    from transformers import Qwen2_5_VLForConditionalGeneration

    with pytest.raises(ValueError, match="trains a LaViT model"):
        LavitSFTTrainer(model=Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir),
                        args=tiny_args(tmp_path, distill=False), train_dataset=lavit15k_dataset(4, TEACHER_WIDTH),
                        processing_class=processor)


@pytest.mark.parametrize("setting, expected", [("last", [1]), ("last_half", [1]), ("0", [0]), ("0,1", [0, 1])])
def test_the_trainer_sets_the_layers_l_traj_reads(lavit_dir, processor, tmp_path, setting, expected):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    assert model.config.latent_attention_layers == "all" and model.config.text_config.num_hidden_layers == 2
    LavitSFTTrainer(model=model, args=tiny_args(tmp_path, latent_attention_layers=setting),
                    train_dataset=lavit15k_dataset(4, TEACHER_WIDTH), processing_class=processor)
    assert model.config.latent_layer_indices() == expected
    assert model.config.latent_attention_layers == expected  # as indices, which every configuration version reads
    model.save_pretrained(tmp_path / "saved")  # the setting travels with the trained model
    assert LavitForConditionalGeneration.from_pretrained(tmp_path / "saved").config.latent_layer_indices() == expected


def test_a_layer_setting_deeper_than_the_student_is_refused(lavit_dir, processor, tmp_path):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    with pytest.raises(ValueError, match="last 3 layers of a 2-layer text model"):
        LavitSFTTrainer(model=model, args=tiny_args(tmp_path, latent_attention_layers="last_3"),
                        train_dataset=lavit15k_dataset(4, TEACHER_WIDTH), processing_class=processor)
    assert model.config.latent_attention_layers == "all"  # left as it was



def test_the_concept_head_stays_frozen_under_lora_where_no_loss_reaches_it(lavit_dir, processor, tmp_path):
    model = LavitForConditionalGeneration.from_pretrained(lavit_dir)
    trainer = LavitSFTTrainer(model=model, args=tiny_args(tmp_path, distill=False), peft_config=lavit_lora_config(model),
                              train_dataset=lavit15k_dataset(4, TEACHER_WIDTH), processing_class=processor)
    head = [(n, p.requires_grad) for n, p in trainer.model.named_parameters() if "concept_head" in n]
    assert head and not any(trainable for _, trainable in head), head  # PEFT's modules_to_save copy included
    assert any(p.requires_grad for n, p in trainer.model.named_parameters() if "lora_" in n)
