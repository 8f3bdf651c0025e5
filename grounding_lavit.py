# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""The quickstart teacher's grounding loss: supervised fine-tuning plus a pull of the attention of the word that names
the key object towards that object's cell (`GroundingCollator`, `GroundedSFTTrainer`).

Why the quickstart's teacher needs it: the real teacher is a large pretrained model that already looks at the object a
question names. A tiny model trained from scratch on the synthetic size question (`synthetic_lavit`) learns the
perception part fast (one object per image: 100% on validation within 500 steps, measured) but not the look-up:
finding the object whose colour the question names takes a two-step circuit (carry the colour word to the answer, then
match it against the image tokens), and from random weights it stays near 50% for thousands of steps (measured: 47.5%
after 2,500 steps with the earlier 6-pixel tiny class, 51-53% after 1,500 steps with the current sizes; a wider or
deeper text model, higher learning rates, fewer colours or mixed object counts did not change that). Adding the term
here, the KL divergence from the key object's cells to the first text layer's attention of the colour word over the
image tokens (the students' trajectory loss with the box as its target), makes the look-up one step and the teacher
accurate in about a thousand steps. It stands in for pretraining; the students never see the boxes, only what the
trained teacher's attention shows the builder.

Tested by tests/test_grounding.py (the target cells and query row against the boxes and the token ids; the loss
against the same attention computed by eager attention).
"""

from __future__ import annotations

import re

import torch

from data_lavit import box_to_token_mask, merged_token_grids
from modeling_lavit import LavitAttentionControl, image_attention_capture, trajectory_loss
from trainer_lavit import LavitDataCollator, LavitSFTTrainer


REFERRING = re.compile(r"\bthe (\w+) object\b")  # the synthetic questions name the key object by its colour


def referring_word(question: str) -> str:
    match = REFERRING.search(question)
    if match is None:
        raise ValueError(
            f"The question {question!r} names no object as 'the <colour> object'; the grounding loss needs the "
            "synthetic task's questions (or set --teacher-grounding-weight 0)."
        )
    return match.group(1)


class GroundingCollator:
    """The Naive-SFT batch of `LavitDataCollator(distill=False)`, plus `grounding_query` `(B, 1)`: the position of the
    question's colour word, and `grounding_target` `(B, N)`: a distribution over each sample's merged image tokens,
    uniform over the cells the key object's box covers (`box_to_token_mask`), right-padded with zeros. Rows need an
    `image`, `question`, `answer` and `box` (pixels of the original image)."""

    def __init__(self, processor, max_length: int | None = None, response_column: str = "answer"):
        self.inner = LavitDataCollator(processor, distill=False, max_length=max_length, response_column=response_column)
        self.tokenizer = processor.tokenizer
        self.merge_size = processor.image_processor.merge_size

    def word_id(self, word: str) -> int:
        ids = self.tokenizer(" " + word, add_special_tokens=False).input_ids
        if len(ids) != 1:
            raise ValueError(
                f"The colour word {word!r} is {len(ids)} tokens for this tokenizer; the grounding loss needs it to be "
                "one (train the tokenizer on the task's questions)."
            )
        return ids[0]

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.inner(rows)
        grids = merged_token_grids(batch["image_grid_thw"], self.merge_size)
        query = torch.zeros(len(rows), 1, dtype=torch.long)
        target = torch.zeros(len(rows), max(height * width for height, width in grids))
        for sample, (row, grid) in enumerate(zip(rows, grids)):
            word = referring_word(row["question"])
            hits = (batch["input_ids"][sample] == self.word_id(word)).nonzero()
            if len(hits) != 1:
                raise ValueError(f"The colour word {word!r} occurs {len(hits)} times in sample {sample}'s tokens, "
                                 "not once.")
            query[sample, 0] = hits[0, 0]
            mask = torch.from_numpy(box_to_token_mask(row["box"], row["image"].size, grid).reshape(-1))
            target[sample, : mask.numel()] = mask.float() / mask.sum()
        batch["grounding_query"] = query
        batch["grounding_target"] = target
        return batch


class GroundedSFTTrainer(LavitSFTTrainer):
    """Naive SFT (`distill=False`) with the grounding term: loss = L_ntp + weight * KL(target || attention), the
    attention being text layer `layer`'s (head-averaged, renormalised over the image tokens) at the colour word."""

    def __init__(self, model, args=None, train_dataset=None, processing_class=None, data_collator=None,
                 callbacks=None, grounding_weight: float = 1.0, grounding_layer: int = 0, **kwargs):
        if args is not None and getattr(args, "distill", False):
            raise ValueError("The grounding loss trains a teacher with plain SFT; set distill=False.")
        if data_collator is None and processing_class is not None:
            data_collator = GroundingCollator(processing_class, max_length=getattr(args, "max_length", None),
                                              response_column=getattr(args, "response_column", "answer"))
        super().__init__(model, args, train_dataset, processing_class, data_collator, callbacks, **kwargs)
        self.grounding_weight = grounding_weight
        self.grounding_layer = grounding_layer

    def grounding_attention(self, model, inputs, num_items_in_batch=None):
        """The forward pass: `(outputs, attention (B, N) renormalised over the image tokens, image-token mask)`."""
        query = inputs.pop("grounding_query")
        capture = image_attention_capture(inputs["input_ids"], self.model.config.image_token_id, query,
                                          layers=[self.grounding_layer], reduce_queries=True)
        outputs = model(**inputs, use_cache=False, return_logits=False, num_items_in_batch=num_items_in_batch,
                        lavit_control=LavitAttentionControl(capture=capture))
        if self.grounding_layer not in capture.per_layer:
            raise RuntimeError("No attention was recorded: the text attention is not 'lavit_sdpa'.")
        attention = capture.per_layer[self.grounding_layer]  # (B, N)
        attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
        return outputs, attention, capture.key_mask

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        target = inputs.pop("grounding_target")  # (B, N): the collator pads as the capture does
        outputs, attention, mask = self.grounding_attention(model, inputs, num_items_in_batch)
        target = target.to(attention.device)
        grounding = trajectory_loss(target, attention[:, None, :], mask)
        ntp, steps = self.next_token_loss(outputs, inputs, num_items_in_batch, mode)
        loss = ntp + self.grounding_weight * grounding / steps  # the grounding term is a mean over this batch
        self._metric(mode, "grounding_loss", grounding)
        self._metric(mode, "grounding_focus", (attention * (target > 0)).sum(-1).mean())
        return (loss, outputs) if return_outputs else loss


__all__ = ["GroundedSFTTrainer", "GroundingCollator", "referring_word"]
