"""Teacher signals from the side channel against eager attention, V_sem pooling, matchers and the filter."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Qwen2_5_VLForConditionalGeneration

from conftest import noise_image
from builder_lavit import anls, answer_matches, filter_stages, normalize_answer
from data_lavit import gaze_topk_weights
from teacher_lavit import (
    check_teacher,
    extract_teacher_signals,
    generate_answers,
    load_qwen2_5_vl,
    teacher_forced_inputs,
)


@pytest.fixture(scope="module")
def teacher(tiny_base_dir):
    return load_qwen2_5_vl(tiny_base_dir, min_pixels=4 * 784, max_pixels=256 * 784)


IMAGES = [noise_image(84, 56, 5), noise_image(112, 140, 6)]  # 2 x 3 and 5 x 4 merged grids
QUESTIONS = ["what color is the object?", "is the dog on the left of the tree?"]


def response_ids(processor):
    end = processor.tokenizer.convert_tokens_to_ids("<|im_end|>")
    return [processor.tokenizer("the red one").input_ids + [end], processor.tokenizer("yes it is there").input_ids + [end]]


def eager_reference(tiny_base_dir, processor, rows_kind):
    """Equation 2 from eager `output_attentions` and V_sem from `hidden_states[-1]`, computed independently."""
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(tiny_base_dir, attn_implementation="eager").eval()
    inputs, response_mask = teacher_forced_inputs(processor, IMAGES, QUESTIONS, response_ids(processor))
    with torch.no_grad():
        out = model(**inputs, output_attentions=True, output_hidden_states=True)
    ids = inputs["input_ids"]
    gaze, v_mean = [], []
    for b in range(2):
        image = (ids[b] == model.config.image_token_id).nonzero()[:, 0]
        if rows_kind == "response":
            rows = response_mask[b].nonzero()[:, 0]
        else:
            text = inputs["attention_mask"][b].bool() & (ids[b] != model.config.image_token_id)
            rows = torch.tensor([i for i in text.nonzero()[:, 0].tolist() if i > image[0]])
        per_layer = [a[b][:, rows][:, :, image].double().mean(dim=(0, 1)) for a in out.attentions]
        gaze.append(torch.stack(per_layer).mean(0).numpy())
        v_mean.append(out.hidden_states[-1][b, image].double().mean(0).numpy())
    return gaze, v_mean, out.hidden_states[-1], inputs


@pytest.mark.parametrize("rows_kind", ["response", "prompt_and_response"])
def test_gaze_and_v_sem_match_eager(teacher, tiny_base_dir, rows_kind):
    model, processor = teacher
    signals = extract_teacher_signals(model, processor, IMAGES, QUESTIONS, response_ids(processor), query_rows=rows_kind)
    gaze, v_mean, hidden, inputs = eager_reference(tiny_base_dir, processor, rows_kind)
    assert signals.grid == [(2, 3), (5, 4)]
    for b in range(2):
        assert signals.gaze[b].shape == (signals.grid[b][0] * signals.grid[b][1],)
        assert np.abs(signals.gaze[b] - gaze[b]).max() <= 1e-6
        assert np.abs(signals.v_sem_mean[b] - v_mean[b]).max() <= 1e-5
        # Equation 3 by hand: min-max normalise, keep the top 8, normalise the weights, pool.
        s = gaze[b]
        a = (s - s.min()) / (s.max() - s.min() + 1e-8)
        top = np.argsort(-a)[:8]
        w = np.zeros_like(a)
        w[top] = a[top]
        w /= w.sum()
        image = (inputs["input_ids"][b] == model.config.image_token_id).nonzero()[:, 0]
        expected = (hidden[b, image].double().numpy() * w[:, None]).sum(0)
        # eager and sdpa hidden states differ by float32 rounding (~1e-5 here); the weights come from eager gaze
        assert np.abs(signals.v_sem_gaze[b] - expected).max() <= 1e-4


def test_rows_change_the_gaze(teacher):
    model, processor = teacher
    a = extract_teacher_signals(model, processor, IMAGES, QUESTIONS, response_ids(processor), query_rows="response")
    b = extract_teacher_signals(model, processor, IMAGES, QUESTIONS, response_ids(processor),
                                query_rows="prompt_and_response")
    assert np.abs(a.gaze[0] - b.gaze[0]).max() > 1e-4


def test_topk_weights_hand_case():
    gaze = torch.tensor([[0.1, 0.5, 0.3, 0.9, 0.2, 0.0]])
    mask = torch.tensor([[True, True, True, True, True, False]])
    w = gaze_topk_weights(gaze, mask, top_k=2)
    # min-max over the 5 real tokens: [0, .5, .25, 1, .125]; top 2: token 3 (1.0) and token 1 (0.5)
    assert torch.allclose(w, torch.tensor([[0, 0.5 / 1.5, 0, 1 / 1.5, 0, 0]]), atol=1e-6)
    flat = gaze_topk_weights(torch.full((1, 4), 0.25), torch.ones(1, 4, dtype=torch.bool), top_k=2)
    assert torch.allclose(flat, torch.full((1, 4), 0.25))  # uniform over every token, no position favoured


def test_generation_with_and_without_image(teacher):
    model, processor = teacher
    texts, ids = generate_answers(model, processor, QUESTIONS, IMAGES, max_new_tokens=5)
    assert len(texts) == 2 and all(1 <= len(i) <= 5 for i in ids)
    blind, _ = generate_answers(model, processor, QUESTIONS, None, max_new_tokens=5)
    assert len(blind) == 2


def test_a_teacher_must_be_qwen2_5_vl(lavit_dir):
    with pytest.raises(ValueError, match="is a 'lavit' model; the teacher must be a stock Qwen2.5-VL"):
        load_qwen2_5_vl(lavit_dir)
    with pytest.raises(ValueError, match="must be a Qwen2.5-VL model"):
        check_teacher(torch.nn.Linear(2, 2))


@pytest.mark.parametrize(
    "prediction, answer, source, expected",
    [
        ("Red.", "red", "gqa", True),
        ("The answer is a red car", "red car", "gqa", True),
        ("reddish", "red", "gqa", False),  # whole words only
        ("", "red", "gqa", False),
        ("blue", "red", "gqa", False),
        ("A", "A", "synthetic", True),  # the option letter A is not the article a
        ("(A)", "A", "synthetic", True),
        ("B", "A", "synthetic", False),
        ("A", "B", "synthetic", False),
        ("The Sign", "sign", "textvqa", True),
        ("INVOICE 1234", "invoice 1235", "docvqa", True),  # ANLS 11/12 >= 0.5
        ("total", "subtotal amount", "docvqa", False),
    ],
)
def test_answer_matcher(prediction, answer, source, expected):
    assert answer_matches(prediction, answer, source) is expected


def test_normalisation_and_anls():
    assert normalize_answer("  The  Cat's hat!") == "cat s hat"
    assert anls("kitten", "sitting") == pytest.approx(1 - 3 / 7)
    assert anls("abc", "abc") == 1.0


@pytest.mark.parametrize(
    "correct, blind, focus, kept, reason",
    [
        (True, False, 0.5, True, None),
        (False, False, 0.5, False, "incorrect"),
        (False, True, 0.0, False, "incorrect"),  # the first failed stage is the reason
        (True, True, 0.5, False, "solvable_without_image"),
        (True, False, 0.19, False, "unfocused"),
        (True, False, 0.20, True, None),
    ],
)
def test_three_stage_filter(correct, blind, focus, kept, reason):
    aligned, got_kept, got_reason = filter_stages(correct, blind, focus, 0.20)
    assert (got_kept, got_reason, aligned) == (kept, reason, focus >= 0.20)


def test_filter_with_chosen_stages():
    assert filter_stages(False, True, 0.1, 0.2, stages=("alignment",)) == (False, False, "unfocused")
    assert filter_stages(False, True, 0.3, 0.2, stages=("alignment",)) == (True, True, None)
    with pytest.raises(ValueError, match="Unknown filter stages"):
        filter_stages(True, False, 1.0, stages=("vibes",))
