# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""A model class for lmms-eval, so its tasks run on a LaViT checkpoint.

With this package and lmms-eval installed, the entry point `lmms_eval.models: lavit` registers it:

    lmms-eval --model lavit --model_args pretrained=path/to/lavit,latent_mode=forced --tasks mmstar

`LavitLmms.generate_until` follows lmms-eval's request protocol: each request's `args` is
`(context, generation_kwargs, doc_to_visual, doc_id, task, split)` and the visuals come from
`doc_to_visual(self.task_dict[task][split][doc_id])`. Multiple-choice tasks are answered by generation; log-likelihood
requests are refused with a clear error.

lmms-eval is not a dependency of this project (its own dependencies bring torchvision, which cannot be installed
beside the pinned CPU torch here); without it, `LavitLmms` derives from a stand-in base with the same interface.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from cli_lavit import checkpoint_model_type
from evaluation_lavit import LATENT_MODES, generate_texts
from processing_lavit import user_turn


logger = logging.getLogger(__name__)

try:  # the real base class when lmms-eval is installed
    from lmms_eval.api.model import lmms as LmmsBase
except ImportError:

    class LmmsBase:  # the part of lmms-eval's `lmms` interface this class relies on
        def __init__(self) -> None:
            self._rank = 0
            self._world_size = 1
            self.task_dict: dict[str, Any] = {}


class LavitLmms(LmmsBase):
    """lmms-eval model `lavit`.

    Args:
        pretrained: a LaViT checkpoint (path or hub id).
        latent_mode: `forced` (default), `none`, `masked`, `zeroed` or `shuffled` (see `evaluation_lavit`).
        batch_size: requests generated together.
        max_new_tokens: default generation length (a request's `max_new_tokens` wins).
        device: `cpu`, `cuda`, ... (default: cuda when available).
        dtype: load dtype (default `auto`).
    """

    def __init__(
        self,
        pretrained: str,
        latent_mode: str = "forced",
        batch_size: int | str = 1,
        max_new_tokens: int | str = 128,
        device: str | None = None,
        dtype: str = "auto",
        **kwargs,
    ) -> None:
        super().__init__()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        if latent_mode not in LATENT_MODES:
            raise ValueError(f"latent_mode must be one of {LATENT_MODES}, got {latent_mode!r}.")
        model_type = checkpoint_model_type(pretrained)  # before any weight, and before a stock processor's imports
        if model_type != "lavit":
            raise ValueError(
                f"{pretrained} is a {model_type!r} checkpoint, not a LaViT one: evaluate a stock Qwen2.5-VL with "
                "lmms-eval's own qwen2_5_vl model, or convert it first (examples/convert_qwen2_5_vl.py)."
            )
        if kwargs:
            logger.warning("LavitLmms ignores the model_args %s", sorted(kwargs))
        self.device_name = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForImageTextToText.from_pretrained(pretrained, trust_remote_code=True, dtype=dtype)
        self.model.to(self.device_name).eval()
        self.processor = AutoProcessor.from_pretrained(pretrained, trust_remote_code=True)
        self.processor.check_model(self.model.config)
        self.latent_mode = latent_mode
        self.batch_size = int(batch_size)
        self.max_new_tokens = int(max_new_tokens)

    def generate_until(self, requests) -> list[str]:
        """Greedy answers to lmms-eval generation requests, in request order."""
        answers: list[str] = []
        for start in range(0, len(requests), self.batch_size):
            chunk = requests[start : start + self.batch_size]
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*[r.args for r in chunk])
            visuals = [list(d(self.task_dict[t][s][i]) or []) for d, t, s, i in zip(doc_to_visual, tasks, splits, doc_ids)]
            answers += self._generate(list(contexts), visuals, dict(gen_kwargs[0] or {}))
        return answers

    def _generate(self, contexts: list[str], visuals: list[list], gen_kwargs: dict) -> list[str]:
        until = gen_kwargs.pop("until", None)
        until = [until] if isinstance(until, str) else list(until or [])
        max_new_tokens = int(gen_kwargs.pop("max_new_tokens", self.max_new_tokens))
        messages = [[user_turn(context.replace("<image>", "").strip(), len(images))]
                    for context, images in zip(contexts, visuals)]
        images = [[image.convert("RGB") for image in v] for v in visuals]
        texts = generate_texts(self.model, self.processor, messages, images if any(images) else None,
                               self.latent_mode, max_new_tokens)
        cut = []
        for text in texts:
            for stop in until:
                if stop and stop in text:
                    text = text.split(stop, 1)[0]
            cut.append(text)
        return cut

    def loglikelihood(self, requests):
        raise NotImplementedError(
            "LavitLmms answers by generation: use lmms-eval tasks with output_type generate_until (MMStar, MMVP, "
            "BLINK and V* all have one)."
        )

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("Multi-round generation is not supported by LavitLmms; use single-round tasks.")


def lmms_eval_manifest():
    """The entry point of the `lmms_eval.models` group: registers `lavit` with lmms-eval's model registry."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lavit", simple_class_path="lmms_eval_lavit.LavitLmms")


__all__ = ["LavitLmms", "lmms_eval_manifest"]
