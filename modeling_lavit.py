# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""LaViT: a Qwen2.5-VL student that writes K latent visual tokens before its answer (paper sections 4.2, C.2).

What this file adds to Qwen2.5-VL, and nothing else:

* an attention function, registered in transformers' `AttentionInterface` under `"lavit_sdpa"` and used by the
  text model only. Given a per-forward `LavitAttentionControl` it (a) adds ln(gamma) to the scores of the gated
  query rows against the image key columns (the curriculum sensory gate, equation 4) and (b) records the
  differentiable attention probabilities of chosen query rows over chosen key columns, per layer, from those rows'
  queries and all keys only. scaled_dot_product_attention does the main computation, so the full (L x L)
  attention matrix is never materialised. Without a control object it is exactly sdpa.
* `LavitForConditionalGeneration`: the Qwen2.5-VL model plus a `sensory_gate` buffer (gamma), the concept
  projection head phi_mlp (equation 6) and a forward that returns the latent tokens' hidden states, the concept
  embedding of the last latent token and, when asked, the latent tokens' attention over the image tokens.
* the two distillation losses of equations 6 and 7 as pure functions, so that the trainer, the tests and anyone
  else compute them the same way.

The attention capture also works on a stock `Qwen2_5_VLForConditionalGeneration` (a teacher): call
`enable_lavit_attention(model)` and pass `lavit_control=LavitAttentionControl(capture=...)` to its forward.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import (
    AttentionInterface,
    AutoModel,
    AutoModelForImageTextToText,
    GenerationMixin,
    Qwen2_5_VLForConditionalGeneration,
)
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_outputs import MultimodalCausalLMOutputWithPast
from transformers.modeling_utils import slice_logits_to_keep
from transformers.utils import can_return_tuple, logging
from transformers.utils.deprecation import deprecate_kwarg


try:  # loaded as remote code from a checkpoint, where the files form a package
    from .configuration_lavit import LavitConfig
except ImportError:  # imported from the repository root
    from configuration_lavit import LavitConfig


logger = logging.get_logger(__name__)

LAVIT_ATTENTION = "lavit_sdpa"
LATENT_INTERVENTIONS = ("masked", "zeroed", "shuffled")


# ----------------------------------------------------------------------------------------------------------------
# Token positions, derived from input_ids
# ----------------------------------------------------------------------------------------------------------------


def padded_positions(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions of the True entries of each row of `mask`, in order, right-padded with 0.

    Args:
        mask: `(B, L)` bool.
    Returns:
        index: `(B, N)` long, N the largest count over rows; valid: `(B, N)` bool, False on padding.
    """
    counts = mask.sum(dim=1)  # (B,)
    width = int(counts.max()) if mask.numel() else 0
    # A stable descending sort of the 0/1 mask puts each row's True positions first, in their original order.
    order = torch.sort(mask.to(torch.int8), dim=1, descending=True, stable=True).indices[:, :width]  # (B, N)
    valid = torch.arange(width, device=mask.device)[None, :] < counts[:, None]  # (B, N)
    return order.masked_fill(~valid, 0), valid


def count_images(input_ids: torch.Tensor, image_token_id: int) -> torch.Tensor:
    """Number of images in each sample: runs of consecutive image tokens. `(B, L)` -> `(B,)` long."""
    is_image = input_ids == image_token_id  # (B, L)
    starts = is_image.clone()
    starts[:, 1:] &= ~is_image[:, :-1]
    return starts.sum(dim=1)


def find_latent_tokens(
    input_ids: torch.Tensor, latent_token_ids: list[int], strict: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Locates the block of K latent tokens in each sample.

    A sample either has no latent token at all, or each of the K tokens exactly once, in order and adjacent;
    anything else raises a `ValueError` naming the sample, or with `strict=False` counts as a sample without a
    latent block (plain inference: a model may write latent tokens itself, and a pass without a KV cache then feeds
    a partly written block back).

    Args:
        input_ids: `(B, L)`.
        latent_token_ids: the K ids, in order.
        strict: raise on a malformed block (where latent outputs are needed) instead of ignoring it.
    Returns:
        index: `(B, K)` long positions (0 for samples without latent tokens); present: `(B,)` bool.
    """
    hits = torch.stack([input_ids == token_id for token_id in latent_token_ids], dim=1)  # (B, K, L)
    counts = hits.sum(dim=2)  # (B, K)
    present = counts.sum(dim=1) > 0  # (B,)
    index = hits.to(torch.int8).argmax(dim=2)  # (B, K) first occurrence
    bad_count = present & (counts != 1).any(dim=1)
    steps_ok = (index[:, 1:] - index[:, :-1] == 1).all(dim=1)  # (B,)
    bad_order = present & ~bad_count & ~steps_ok
    if not strict:
        present = present & ~bad_count & ~bad_order
    elif bad_count.any() or bad_order.any():
        sample = int((bad_count | bad_order).nonzero()[0, 0])
        raise ValueError(
            f"Sample {sample} has a malformed latent block (token counts {counts[sample].tolist()} for ids "
            f"{list(latent_token_ids)}): each of the {len(latent_token_ids)} latent tokens must appear exactly once, "
            "in order and adjacent, right at the start of the answer. Build prompts with LavitProcessor."
        )
    return index.masked_fill(~present[:, None], 0), present


# ----------------------------------------------------------------------------------------------------------------
# The attention side channel
# ----------------------------------------------------------------------------------------------------------------


class AttentionCapture:
    """Records, per text layer, the attention probabilities of chosen query rows over chosen key columns.

    The probabilities are those of the full softmax over all keys (causal and padding masks and the sensory gate
    included), restricted afterwards to the chosen columns, averaged over heads. They are computed from the chosen
    rows' queries and all keys, in float32, and stay differentiable.

    Args:
        query_index: `(B, R)` long, positions of the query rows.
        key_index: `(B, N)` long, positions of the key columns (e.g. the image tokens).
        query_mask: `(B, R)` bool, valid rows (default: all).
        key_mask: `(B, N)` bool, valid columns (default: all); invalid columns read 0.
        layers: text-layer indices to record (default: all).
        reduce_queries: if True each layer's record is averaged over the valid rows, `(B, N)`; else `(B, R, N)`.
        average_heads: if False the heads are kept, `(B, H, R, N)` (or `(B, H, N)` with `reduce_queries`).

    After the forward, `per_layer[i]` holds layer i's record; `mean_over_layers()` averages them.
    """

    def __init__(
        self,
        query_index: torch.Tensor,
        key_index: torch.Tensor,
        query_mask: torch.Tensor | None = None,
        key_mask: torch.Tensor | None = None,
        layers: list[int] | None = None,
        reduce_queries: bool = False,
        average_heads: bool = True,
    ):
        if query_index.ndim != 2 or key_index.ndim != 2 or query_index.shape[0] != key_index.shape[0]:
            raise ValueError(
                f"AttentionCapture needs (B, R) query and (B, N) key positions, got {tuple(query_index.shape)} "
                f"and {tuple(key_index.shape)}."
            )
        self.query_index = query_index
        self.key_index = key_index
        self.query_mask = query_mask if query_mask is not None else torch.ones_like(query_index, dtype=torch.bool)
        self.key_mask = key_mask if key_mask is not None else torch.ones_like(key_index, dtype=torch.bool)
        self.layers = None if layers is None else set(layers)
        self.reduce_queries = reduce_queries
        self.average_heads = average_heads
        self.per_layer: dict[int, torch.Tensor] = {}

    def wants(self, layer_idx: int) -> bool:
        return self.layers is None or layer_idx in self.layers

    def record(
        self,
        layer_idx: int,
        query: torch.Tensor,
        key: torch.Tensor,
        attention_mask: torch.Tensor | None,
        scaling: float,
    ) -> None:
        """Computes and stores layer `layer_idx`'s probabilities (called by the attention function).

        Args:
            query: `(B, H, L, d)` after RoPE. key: `(B, H_kv, L_k, d)` after RoPE, before grouped-query repetition.
                With the sensory gate these are the widened operands that carry the gate (see
                `LavitAttentionControl`), so the gate is part of the recorded scores.
            attention_mask: what sdpa received: None (plain causal), a bool `(B|1, 1, L, L_k)` mask or an additive
                float one.
        """
        batch, heads, _, head_dim = query.shape
        kv_heads, key_length = key.shape[1], key.shape[2]
        rows = self.query_index.shape[1]
        index = self.query_index.to(query.device)
        q = query.gather(2, index[:, None, :, None].expand(batch, heads, rows, head_dim))  # (B, H, R, d)
        # Query head h reads key head h // n_rep (repeat_kv's layout), so grouping the heads avoids repeating K.
        q = q.float().reshape(batch, kv_heads, (heads // kv_heads) * rows, head_dim)
        scores = torch.matmul(q, key.float().transpose(-1, -2)) * scaling  # (B, H_kv, n_rep * R, L_k)
        scores = scores.view(batch, heads, rows, key_length)  # (B, H, R, L_k)
        scores = scores + self._mask_rows(attention_mask, index, key_length, batch, query.device)
        probs = scores.softmax(dim=-1)  # (B, H, R, L_k)
        columns = self.key_index.to(query.device)
        probs = probs.gather(3, columns[:, None, None, :].expand(batch, heads, rows, columns.shape[1]))  # (B,H,R,N)
        probs = probs * self.key_mask.to(query.device)[:, None, None, :]  # (B, H, R, N)
        if self.average_heads:
            probs = probs.mean(dim=1, keepdim=True)  # (B, 1, R, N)
        if self.reduce_queries:
            weights = self.query_mask.to(probs.device, probs.dtype)[:, None, :, None]  # (B, 1, R, 1)
            probs = (probs * weights).sum(dim=2) / weights.sum(dim=2).clamp_min(1)  # (B, H|1, N)
        self.per_layer[layer_idx] = probs.squeeze(1) if self.average_heads else probs

    @staticmethod
    def _mask_rows(attention_mask, index, key_length, batch, device) -> torch.Tensor:
        """The additive mask of the chosen rows, `(B, 1, R, L_k)` float32 (0 where allowed)."""
        if attention_mask is None:  # sdpa ran with is_causal=True: query i sees keys 0..i
            allowed = torch.arange(key_length, device=device)[None, None, None, :] <= index[:, None, :, None]
            return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, float("-inf"))
        mask = attention_mask.expand(batch, -1, -1, -1)
        rows = mask.gather(2, index[:, None, :, None].expand(batch, mask.shape[1], index.shape[1], key_length))
        if rows.dtype == torch.bool:
            return torch.zeros(rows.shape, device=device).masked_fill(~rows, float("-inf"))
        return rows.float()

    def stacked(self) -> torch.Tensor:
        """All recorded layers in layer order, `(num_layers, B, ...)`."""
        if not self.per_layer:
            raise RuntimeError(
                "No attention was recorded: the model's text attention is not 'lavit_sdpa' (call "
                "enable_lavit_attention(model)) or lavit_control was not passed to the forward."
            )
        return torch.stack([self.per_layer[i] for i in sorted(self.per_layer)])

    def mean_over_layers(self) -> torch.Tensor:
        return self.stacked().mean(dim=0)


class LavitAttentionControl:
    """What the `lavit_sdpa` attention function should do in one forward pass; passed as `lavit_control=`.

    The gate adds ln(gamma) to the scores of the block (gated query rows) x (image key columns). That block is the
    outer product of two indicator vectors, so for 0 < gamma < 1 it is added without any (L x L) mask: each query
    gets an extra coordinate a_i (1 on gated rows) and each key an extra coordinate c_j (ln(gamma) / scale on image
    columns), so that the extra term of q'.k' * scale is exactly ln(gamma) on the block and 0 elsewhere. sdpa then
    keeps its causal fast path (and flash kernels on GPU); the extra coordinates are padded to 8 so kernel-friendly
    head widths stay so. gamma = 0 (a hard mask, -inf on the block) cannot ride on a coordinate (0 * -inf), so it
    builds an additive (B, 1, L, L) mask instead, once per forward, shared by the layers.

    Args:
        log_gate: ln(gamma) added to the gated block (`-inf` for gamma = 0, a hard mask); None for no gate.
        gated_queries: `(B, L)` bool, the query rows the gate restrains.
        image_keys: `(B, L)` bool, the key columns they are restrained from.
        capture: an `AttentionCapture` to fill, or None.
        blocked_keys: `(B, L_k)` bool, key columns that the queries after `blocked_after` may not attend to (the
            `masked` latent mode: no query after the latent block sees it). Works with a KV cache.
        blocked_after: `(B,)` long, the absolute position after which queries are blocked from `blocked_keys`.
    """

    GATE_WIDTH = 8

    def __init__(
        self,
        log_gate: float | None = None,
        gated_queries: torch.Tensor | None = None,
        image_keys: torch.Tensor | None = None,
        capture: AttentionCapture | None = None,
        blocked_keys: torch.Tensor | None = None,
        blocked_after: torch.Tensor | None = None,
    ):
        if log_gate is not None and (gated_queries is None or image_keys is None):
            raise ValueError("A sensory gate needs both gated_queries and image_keys.")
        if (blocked_keys is None) != (blocked_after is None):
            raise ValueError("Blocking keys needs both blocked_keys and blocked_after.")
        if blocked_keys is not None and log_gate is not None:
            raise ValueError("The sensory gate (training) and blocked latent keys (inference) do not combine.")
        if log_gate is not None and (math.isnan(log_gate) or log_gate > 0):
            raise ValueError(f"log_gate must be ln(gamma) for gamma in [0, 1], got {log_gate}.")
        self.log_gate = log_gate
        self.gated_queries = gated_queries
        self.image_keys = image_keys
        self.capture = capture
        self.blocked_keys = blocked_keys
        self.blocked_after = blocked_after
        self._mask_cache: tuple[object, torch.Tensor] | None = None

    def apply_gate(self, query, key, value, attention_mask, scaling):
        """The operands of the gated sdpa call: `(query, key, value, attention_mask)`, the first three widened by
        the gate's coordinates (0 < gamma < 1) or the mask made hard (gamma = 0). The caller cuts the attention
        output back to the original head width."""
        batch, heads, q_length, _ = query.shape
        if key.shape[2] != q_length:
            raise ValueError(
                "The sensory gate is applied without a KV cache only (training and teacher-forced passes); set "
                "model.set_sensory_gate(1.0) to generate."
            )
        if math.isinf(self.log_gate):
            return query, key, value, self._hard_mask(attention_mask, query)
        kv_heads, dtype, device = key.shape[1], query.dtype, query.device
        rows = self.gated_queries.to(device=device, dtype=dtype)[:, None, :, None]  # (B, 1, L, 1)
        cols = self.image_keys.to(device=device, dtype=dtype)[:, None, :, None] * (self.log_gate / scaling)
        pad_q = query.new_zeros(batch, heads, q_length, self.GATE_WIDTH - 1)
        pad_k = key.new_zeros(batch, kv_heads, q_length, self.GATE_WIDTH - 1)
        query = torch.cat([query, rows.expand(-1, heads, -1, -1), pad_q], dim=-1)  # (B, H, L, d + 8)
        key = torch.cat([key, cols.expand(-1, kv_heads, -1, -1), pad_k], dim=-1)  # (B, H_kv, L, d + 8)
        value = torch.cat([value, value.new_zeros(batch, kv_heads, q_length, self.GATE_WIDTH)], dim=-1)
        return query, key, value, attention_mask

    def block_keys(self, attention_mask, query, key) -> torch.Tensor:
        """The model's mask with -inf where a query after `blocked_after` meets a blocked key, `(B, 1, L_q, L_k)`.
        Queries are the last `L_q` positions of the `L_k` keys (a KV cache holds the earlier ones)."""
        if self._mask_cache is not None and self._mask_cache[0] is attention_mask:
            return self._mask_cache[1]
        batch, _, q_length, _ = query.shape
        k_length, device, dtype = key.shape[2], query.device, query.dtype
        positions = torch.arange(k_length - q_length, k_length, device=device)  # absolute query positions
        later = positions[None, :] > self.blocked_after.to(device)[:, None]  # (B, L_q)
        keys = torch.zeros(batch, k_length, dtype=torch.bool, device=device)
        width = min(k_length, self.blocked_keys.shape[1])
        keys[:, :width] = self.blocked_keys.to(device)[:, :width]
        block = later[:, None, :, None] & keys[:, None, None, :]  # (B, 1, L_q, L_k)
        mask = torch.zeros(block.shape, dtype=dtype, device=device).masked_fill(block, float("-inf"))
        minimum = torch.finfo(dtype).min
        if attention_mask is None:
            allowed = torch.arange(k_length, device=device)[None, :] <= positions[:, None]  # causal
            mask = mask.masked_fill(~allowed[None, None], minimum)
        elif attention_mask.dtype == torch.bool:
            mask = mask.masked_fill(~attention_mask, minimum)
        else:
            mask = mask + attention_mask.to(dtype)
        self._mask_cache = (attention_mask, mask)
        return mask

    def _hard_mask(self, attention_mask, query) -> torch.Tensor:
        """The additive mask of gamma = 0: the model's mask with -inf on the gated block, `(B, 1, L, L)`."""
        if self._mask_cache is not None and self._mask_cache[0] is attention_mask:
            return self._mask_cache[1]
        length, device, dtype = query.shape[2], query.device, query.dtype
        block = self.gated_queries.to(device)[:, None, :, None] & self.image_keys.to(device)[:, None, None, :]
        mask = torch.zeros(block.shape, dtype=dtype, device=device).masked_fill(block, float("-inf"))  # (B,1,L,L)
        if attention_mask is None:
            allowed = torch.ones(length, length, dtype=torch.bool, device=device).tril()
            mask = mask.masked_fill(~allowed, torch.finfo(dtype).min)
        elif attention_mask.dtype == torch.bool:
            mask = mask.masked_fill(~attention_mask, torch.finfo(dtype).min)
        else:
            mask = mask + attention_mask.to(dtype)
        self._mask_cache = (attention_mask, mask)
        return mask


def lavit_sdpa_attention_forward(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    lavit_control: LavitAttentionControl | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """sdpa attention with LaViT's sensory gate and attention side channel (see `LavitAttentionControl`)."""
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    head_dim = value.shape[-1]
    if lavit_control is not None and lavit_control.log_gate is not None:
        query, key, value, attention_mask = lavit_control.apply_gate(query, key, value, attention_mask, scale)
    elif lavit_control is not None and lavit_control.blocked_keys is not None:
        attention_mask = lavit_control.block_keys(attention_mask, query, key)
    attn_output, _ = sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scale, is_causal=is_causal, **kwargs
    )
    capture = lavit_control.capture if lavit_control is not None else None
    if capture is not None and capture.wants(module.layer_idx):
        # The operands sdpa saw, gate included: the recorded rows are exactly the probabilities it used.
        capture.record(module.layer_idx, query, key, attention_mask, scale)
    return attn_output[..., :head_dim], None


AttentionInterface.register(LAVIT_ATTENTION, lavit_sdpa_attention_forward)
AttentionMaskInterface.register(LAVIT_ATTENTION, sdpa_mask)


def model_device(model) -> torch.device:
    """The device of the model's input embeddings: where its inputs go, also under a device map."""
    return model.get_input_embeddings().weight.device


def enable_lavit_attention(model: nn.Module) -> nn.Module:
    """Switches the text attention of a Qwen2.5-VL or LaViT model to `lavit_sdpa` (the vision tower keeps its own).

    Without a `lavit_control` argument the forward is unchanged (plain sdpa); with one, it gates and records as
    the control says. Returns the model.
    """
    vision = model.config.vision_config._attn_implementation or "sdpa"
    model.set_attn_implementation({"text_config": LAVIT_ATTENTION, "vision_config": vision})
    return model


def image_attention_capture(
    input_ids: torch.Tensor,
    image_token_id: int,
    query_index: torch.Tensor,
    query_mask: torch.Tensor | None = None,
    layers: list[int] | None = None,
    reduce_queries: bool = False,
) -> AttentionCapture:
    """An `AttentionCapture` of the given query rows over each sample's image tokens (columns padded to the
    largest image of the batch; `capture.key_mask` marks the real ones)."""
    key_index, key_mask = padded_positions(input_ids == image_token_id)
    return AttentionCapture(query_index, key_index, query_mask, key_mask, layers=layers, reduce_queries=reduce_queries)


# ----------------------------------------------------------------------------------------------------------------
# Distillation losses (equations 6 and 7)
# ----------------------------------------------------------------------------------------------------------------


def concept_loss(concept_embeds: torch.Tensor, teacher_semantics: torch.Tensor) -> torch.Tensor:
    """Semantic reconstruction, equation 6: 1 - mean over the batch of cos(phi(h_z), V_sem).

    Args:
        concept_embeds: `(B, D_t)`, phi_mlp of the last latent token's hidden state.
        teacher_semantics: `(B, D_t)`, the teacher's pooled visual semantics (a fixed target; no gradient).
    Returns:
        scalar tensor in [0, 2].
    """
    if concept_embeds.shape != teacher_semantics.shape:
        raise ValueError(
            f"concept_loss needs matching shapes, got {tuple(concept_embeds.shape)} and "
            f"{tuple(teacher_semantics.shape)}; the concept head's width is config.teacher_hidden_size."
        )
    cosine = F.cosine_similarity(concept_embeds.float(), teacher_semantics.detach().float(), dim=-1)  # (B,)
    return 1.0 - cosine.mean()


def trajectory_loss(
    teacher_attention: torch.Tensor,
    student_attention: torch.Tensor,
    mask: torch.Tensor | None = None,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Trajectory alignment, equation 7: (1/B) sum_i sum_j KL(A_traj^(i,j) || A_student^(i,j)).

    Args:
        teacher_attention: `(B, K, N)` or `(B, N)` target distributions over image tokens (each sums to 1; a
            `(B, N)` target is shared by the K latent tokens).
        student_attention: `(B, K, N)` the latent tokens' attention over the image tokens (each sums to 1).
        mask: `(B, N)` bool, real image tokens (padding columns must carry no mass in either).
        eps: floor on the student probabilities inside the log.
    Returns:
        scalar tensor: the KL summed over the K latent tokens, averaged over the batch. Target zeros contribute 0.
    """
    if teacher_attention.ndim == 2:
        teacher_attention = teacher_attention[:, None, :].expand_as(student_attention)
    if teacher_attention.shape != student_attention.shape:
        raise ValueError(
            f"trajectory_loss needs matching shapes, got teacher {tuple(teacher_attention.shape)} and student "
            f"{tuple(student_attention.shape)}; resize the teacher's gaze to the student's image token grid."
        )
    target = teacher_attention.detach().float()
    student = student_attention.float()
    terms = torch.where(target > 0, target * (target.clamp_min(1e-30).log() - student.clamp_min(eps).log()), 0.0)
    if mask is not None:
        terms = terms * mask[:, None, :].to(terms.dtype)
    return terms.sum(dim=(1, 2)).mean()


TOKEN_LOSS_TYPES = ("nll", "dft")


def labelled_token_outputs(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
    loss_type: str = "nll",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Next-token loss computed from the labelled positions only, without the `(B, L, vocab)` logits, and the token
    statistics TRL logs.

    Args:
        lm_head: the output projection.
        hidden_states: `(B, L, D)` last hidden states.
        labels: `(B, L)`, `ignore_index` where no loss is taken; position i predicts label i + 1.
        num_items_in_batch: the divisor (the labelled tokens of the whole accumulated batch, as the Trainer counts
            them); default: the labelled tokens here.
        loss_type: `"nll"` (cross-entropy) or `"dft"` (each token's cross-entropy weighted by its probability, without
            gradient through the weight: TRL's `loss_type="dft"`).
    Returns:
        `(loss, labelled tokens, summed entropy, tokens whose label is the top-1 prediction)`: the loss is the summed
        token losses over `num_items_in_batch` (for "nll" the value `ForCausalLMLoss` gives); the three counts carry
        no gradient.
    """
    if loss_type not in TOKEN_LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {TOKEN_LOSS_TYPES}, got {loss_type!r}.")
    targets = labels[:, 1:].to(hidden_states.device)  # (B, L - 1)
    keep = targets != ignore_index
    logits = lm_head(hidden_states[:, :-1][keep]).float()  # (n, vocab)
    wanted = targets[keep]
    total = summed_token_loss(logits, wanted, loss_type)
    divisor = num_items_in_batch if num_items_in_batch is not None else keep.sum().clamp_min(1)
    if torch.is_tensor(divisor):
        divisor = divisor.to(total.device)
    return total / divisor, keep.sum(), *token_statistics(logits, wanted)


def summed_token_loss(logits: torch.Tensor, targets: torch.Tensor, loss_type: str = "nll") -> torch.Tensor:
    """The summed next-token loss of `(n, vocab)` logits against `(n,)` labels: cross-entropy ("nll"), or each
    token's cross-entropy weighted by its probability without gradient through the weight ("dft")."""
    if loss_type == "nll":
        return F.cross_entropy(logits, targets, reduction="sum")
    per_token = F.cross_entropy(logits, targets, reduction="none")
    return (per_token * torch.exp(-per_token).detach()).sum()


@torch.no_grad()
def token_statistics(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`(summed entropy of the predictions, how many labels are the top-1 prediction)` of `(n, vocab)` logits
    against `(n,)` labels: what TRL's `entropy` and `mean_token_accuracy` average."""
    log_probs = logits.float().log_softmax(dim=-1)
    return -(log_probs.exp() * log_probs).sum(), (logits.argmax(dim=-1) == targets).sum()


def labelled_token_loss(
    lm_head: nn.Module,
    hidden_states: torch.Tensor,
    labels: torch.Tensor,
    num_items_in_batch: torch.Tensor | int | None = None,
    ignore_index: int = -100,
) -> torch.Tensor:
    """The cross-entropy of `labelled_token_outputs` alone: summed token losses over `num_items_in_batch` (the same
    value `ForCausalLMLoss` gives), without the `(B, L, vocab)` logits."""
    return labelled_token_outputs(lm_head, hidden_states, labels, num_items_in_batch, ignore_index)[0]


# ----------------------------------------------------------------------------------------------------------------
# Model
# ----------------------------------------------------------------------------------------------------------------


@dataclass
class LatentBlock:
    """Where the forward found each sample's latent block: `index` `(B, K)` positions and `present` `(B,)` (None when
    it did not search), `every` sample holds one, and whether the latent states are `compute`d."""

    index: torch.Tensor | None
    present: torch.Tensor | None
    every: bool
    compute: bool


@dataclass
class LavitCausalLMOutputWithPast(MultimodalCausalLMOutputWithPast):
    """
    Output of [`LavitForConditionalGeneration`]: the fields of Qwen2.5-VL's output plus

    Args:
        latent_hidden_states (`torch.FloatTensor` of shape `(batch_size, K, hidden_size)`, *optional*):
            The last-layer hidden states (after the final norm) at the K latent tokens, h_z. Present when every
            sample holds the latent block.
        concept_embeds (`torch.FloatTensor` of shape `(batch_size, teacher_hidden_size)`, *optional*):
            phi_mlp(h_z) of the **last** latent token (paper C.2), compared with the teacher's V_sem (equation 6).
        latent_image_attention (`torch.FloatTensor` of shape `(batch_size, K, num_image_tokens)`, *optional*):
            Each latent token's attention over its sample's image tokens, averaged over heads and over
            `config.latent_attention_layers`, renormalised to sum to 1 (A_student of equation 7). Returned when
            `output_latent_attention=True`.
        image_token_mask (`torch.BoolTensor` of shape `(batch_size, num_image_tokens)`, *optional*):
            True on each sample's real image tokens; samples with smaller images are right-padded.
        concept_loss (`torch.FloatTensor`, *optional*):
            Equation 6, when `teacher_semantics` is given.
        trajectory_loss (`torch.FloatTensor`, *optional*):
            Equation 7, when `teacher_trajectory` is given.
        sensory_gate (`float`, *optional*):
            The gamma this forward ran with.
        label_count, label_entropy_sum, label_top1_count (`torch.Tensor`, *optional*):
            Without logits (`return_logits=False`) and with labels: the labelled tokens, the summed entropy of their
            predictions and how many labels are the top-1 prediction (TRL's `entropy` and `mean_token_accuracy`).
    """

    latent_hidden_states: torch.FloatTensor | None = None
    concept_embeds: torch.FloatTensor | None = None
    latent_image_attention: torch.FloatTensor | None = None
    image_token_mask: torch.BoolTensor | None = None
    concept_loss: torch.FloatTensor | None = None
    trajectory_loss: torch.FloatTensor | None = None
    sensory_gate: float | None = None
    label_count: torch.Tensor | None = None
    label_entropy_sum: torch.Tensor | None = None
    label_top1_count: torch.Tensor | None = None


class LavitConceptHead(nn.Module):
    """phi_mlp of equation 6: Linear -> GELU -> Linear, from the text width to the teacher's width."""

    def __init__(self, config: LavitConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.text_config.hidden_size, config.concept_head_hidden_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(config.concept_head_hidden_size, config.teacher_hidden_size)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(hidden_states)))  # (..., teacher_hidden_size)


class LavitForConditionalGeneration(Qwen2_5_VLForConditionalGeneration, GenerationMixin):  # generation as stock
    """Qwen2.5-VL with LaViT's latent visual thoughts: a sensory gate, a concept head and latent-attention outputs.

    The text attention runs through `lavit_sdpa`, which is plain sdpa unless the gate is below 1 or latent
    attention is requested. gamma lives in the non-persistent buffer `sensory_gate` (1.0 on load; the trainer's
    callback moves it) and is set with `set_sensory_gate`.
    """

    config_class = LavitConfig
    config: LavitConfig

    def __init__(self, config: LavitConfig):
        super().__init__(config)
        self.concept_head = LavitConceptHead(config)
        self.register_buffer("sensory_gate", torch.tensor(1.0), persistent=False)
        # The same gamma as a Python float, read under torch.compile: a tensor's value cannot steer a traced graph,
        # a float attribute can (dynamo guards on it, so a new gamma recompiles).
        self._sensory_gate_value = 1.0
        if config.text_config._attn_implementation in (None, "sdpa"):
            enable_lavit_attention(self)
        self.post_init()

    def _init_weights(self, module):
        super()._init_weights(module)
        if module is self:
            with torch.no_grad():
                self.sensory_gate.fill_(1.0)
            self._sensory_gate_value = 1.0

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, always with the remote code its `auto_map` names: however the class was
        imported (from a checkpoint's remote code, or from this repository in a notebook or a test), the folder gets
        `configuration_lavit.py` and `modeling_lavit.py` and a config whose `auto_map` names them, so a fresh
        process loads it with `AutoModelForImageTextToText.from_pretrained(path, trust_remote_code=True)`. The
        Trainer's checkpoints and `save_model`, and PEFT's merged models, save through here."""
        type(self.config).register_for_auto_class()
        type(self).register_for_auto_class("AutoModelForImageTextToText")
        auto_map = dict(getattr(self.config, "auto_map", None) or {})
        auto_map.setdefault("AutoModel", f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}")
        self.config.auto_map = auto_map
        return super().save_pretrained(save_directory, *args, **kwargs)

    def _reentrant_checkpointing(self) -> bool:
        """Whether any text layer recomputes its activations with reentrant checkpointing."""
        for layer in self.model.language_model.layers:
            function = getattr(layer, "_gradient_checkpointing_func", None)
            if getattr(layer, "gradient_checkpointing", False) and getattr(function, "keywords", {}).get(
                    "use_reentrant") is True:
                return True
        return False

    def set_sensory_gate(self, gamma: float) -> None:
        """Sets gamma in [0, 1]: 1 leaves attention untouched, 0 cuts the gated rows off the image (a hard mask)."""
        gamma = float(gamma)
        if not 0.0 <= gamma <= 1.0 or math.isnan(gamma):
            raise ValueError(
                f"The sensory gate gamma must lie in [0, 1], got {gamma}: 1 is the open gate, 0 a hard mask and the "
                "paper's schedule starts at 1e-6."
            )
        self.sensory_gate.fill_(gamma)
        self._sensory_gate_value = gamma

    def _gate_value(self) -> float:
        """gamma for this forward: the buffer's value in eager mode; under torch.compile the float that
        `set_sensory_gate` (or the last eager forward) left, since a traced graph cannot branch on a tensor."""
        if torch.compiler.is_compiling():
            return self._sensory_gate_value
        gamma = float(self.sensory_gate)
        if not 0.0 <= gamma <= 1.0 or math.isnan(gamma):
            raise ValueError(
                f"model.sensory_gate holds {gamma}, outside [0, 1]; set it with model.set_sensory_gate(gamma)."
            )
        self._sensory_gate_value = gamma
        return gamma

    def resize_token_embeddings(
        self, new_num_tokens: int | None = None, pad_to_multiple_of: int | None = None, mean_resizing: bool = True
    ) -> nn.Embedding:
        """As the stock method (rows below the new size keep their values, the latent tokens' included), but a size
        that would cut the latent tokens' rows is refused instead of leaving ids the embedding no longer holds."""
        latent_ids = self.config.latent_token_ids or []
        if new_num_tokens is not None and latent_ids:
            size = new_num_tokens
            if pad_to_multiple_of:
                size = -(-new_num_tokens // pad_to_multiple_of) * pad_to_multiple_of
            if size <= max(latent_ids):
                raise ValueError(
                    f"resize_token_embeddings({new_num_tokens}) would drop the rows of the latent tokens "
                    f"{self.config.latent_tokens} (ids {list(latent_ids)}); keep at least {max(latent_ids) + 1} rows."
                )
        return super().resize_token_embeddings(new_num_tokens, pad_to_multiple_of, mean_resizing)

    def _check_text_attention(self, what: str) -> None:
        if self.config.text_config._attn_implementation != LAVIT_ATTENTION:
            raise ValueError(
                f"{what} needs the text attention '{LAVIT_ATTENTION}', but this model runs "
                f"'{self.config.text_config._attn_implementation}'. Load it without attn_implementation, or call "
                "enable_lavit_attention(model)."
            )

    # As the stock forward: `return_dict=False` (argument or config) gives a tuple, and the old cache name warns.
    @can_return_tuple
    @deprecate_kwarg("past_key_values", "5.40.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        pixel_values_videos: torch.FloatTensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        video_grid_thw: torch.LongTensor | None = None,
        mm_token_type_ids: torch.IntTensor | None = None,
        second_per_grid_ts: torch.Tensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs=None,
        output_latent_states: bool | None = None,
        output_latent_attention: bool = False,
        teacher_semantics: torch.Tensor | None = None,
        teacher_trajectory: torch.Tensor | None = None,
        return_logits: bool = True,
        token_loss_type: str = "nll",
        latent_intervention: str | None = None,
        latent_positions: torch.Tensor | None = None,
        **kwargs,
    ) -> LavitCausalLMOutputWithPast:
        r"""
        The arguments of [`Qwen2_5_VLForConditionalGeneration.forward`], plus:

        output_latent_states (`bool`, *optional*):
            Whether to return `latent_hidden_states` and `concept_embeds`. `None` (default): when every sample holds
            a well-formed latent block; otherwise (decoding steps, a batch mixing samples with and without one, a
            block the model partly wrote again itself) none for the whole batch and no error, unless the gate is
            below 1 or a latent intervention is set; `True`: required, a sample without a well-formed block is an
            error; `False`: never. Under `torch.compile` the default reads as `False` (a traced graph cannot
            depend on where the tokens are); latent outputs, the gate below 1 and interventions compile with graph
            breaks, and `fullgraph=True` refuses them by name.
        output_latent_attention (`bool`, *optional*, defaults to `False`):
            Whether to return `latent_image_attention` and `image_token_mask`. Every sample needs the latent block
            and exactly one image.
        teacher_semantics (`torch.Tensor` of shape `(batch_size, teacher_hidden_size)`, *optional*):
            V_sem; when given, `concept_loss` (equation 6) is returned.
        teacher_trajectory (`torch.Tensor` of shape `(batch_size, [K,] num_image_tokens)`, *optional*):
            The teacher's gaze on the student's image grid, each row a distribution; when given, latent attention is
            computed and `trajectory_loss` (equation 7) is returned.
        return_logits (`bool`, *optional*, defaults to `True`):
            With `False` the `(B, L, vocab)` logits are not built: the next-token loss is computed from the labelled
            positions only (`labelled_token_outputs`), `logits` is None and the label statistics are returned.
            Training uses it.
        token_loss_type (`str`, *optional*, defaults to `"nll"`):
            With `return_logits=False`: `"nll"` or `"dft"` (TRL's `loss_type`; see `labelled_token_outputs`).
        latent_intervention (`str`, *optional*):
            An inference-time ablation of the latent tokens (Table 3 and beyond): `"masked"`, no query after the latent
            block may attend to the latent positions (through generation too); `"zeroed"`, the latent tokens' input
            embeddings are zeroed; `"shuffled"`, at every layer each sample's hidden states at its latent positions are
            replaced by the next sample's (a batch of at least two). Forced latents (`LavitProcessor`'s default) and no
            latents (`add_latent_tokens=False`) need no intervention.
        latent_positions (`torch.LongTensor` of shape `(batch_size, K)`, *optional*):
            Where the latent tokens sit, for `"masked"` decoding steps whose `input_ids` no longer hold them (pass
            `find_latent_tokens(prompt_ids, ids)[0]` to `generate`); derived from `input_ids` otherwise.
        lavit_control (`LavitAttentionControl`, *optional*, in `kwargs`):
            Replaces the control the model builds from its gate and `output_latent_attention` (for analyses that
            record other rows); `latent_image_attention` is then not computed.
        """
        output_latent_attention = bool(output_latent_attention or teacher_trajectory is not None)
        if output_latent_attention and self.training and torch.is_grad_enabled() and self._reentrant_checkpointing():
            raise ValueError(
                "Reentrant activation checkpointing (use_reentrant=True) cuts the gradients of the latent tokens' "
                "attention, so L_traj would not train the model. Enable it with activation_checkpointing_enable("
                "activation_checkpointing_kwargs={'use_reentrant': False}) (transformers' default), or turn it off."
            )
        output_latent_states = self._check_request(output_latent_states, teacher_semantics, pixel_values,
                                                   mm_token_type_ids, position_ids)
        gamma = self._gate_value()
        if torch.compiler.is_compiling():
            output_latent_states = self._traceable_latent_request(
                output_latent_states, output_latent_attention, gamma, latent_intervention
            )
        past_length = cache.get_seq_length() if cache is not None else 0
        latents = self._find_latent_block(input_ids, past_length, output_latent_states, output_latent_attention, gamma,
                                          latent_intervention)
        supplied = kwargs.get("lavit_control")
        control, capture = self._attention_control(input_ids, inputs_embeds, attention_mask, latents, gamma,
                                                   output_latent_attention, latent_intervention, latent_positions,
                                                   past_length, supplied)
        if control is not None:
            kwargs["lavit_control"] = control
        inputs_embeds, hooks = self._intervene(latent_intervention, latents, input_ids, inputs_embeds)
        try:
            outputs = self.model(
                input_ids=input_ids,
                pixel_values=pixel_values,
                pixel_values_videos=pixel_values_videos,
                image_grid_thw=image_grid_thw,
                video_grid_thw=video_grid_thw,
                second_per_grid_ts=second_per_grid_ts,
                mm_token_type_ids=mm_token_type_ids,
                position_ids=position_ids,
                attention_mask=attention_mask,
                cache=cache,
                inputs_embeds=inputs_embeds,
                use_cache=use_cache,
                mm_encoder_outputs=mm_encoder_outputs,
                return_dict=True,  # read by name below; a config with return_dict=False gets its tuple at the end
                **kwargs,
            )
        finally:
            for hook in hooks:
                hook.remove()
        kwargs.pop("lavit_control", None)
        if return_logits and token_loss_type != "nll":
            raise ValueError(f"token_loss_type={token_loss_type!r} applies to return_logits=False; with logits the loss "
                             "is the model's cross-entropy.")
        kwargs["token_loss_type"] = token_loss_type
        return self._lavit_outputs(outputs, labels, logits_to_keep, return_logits, latents, capture, gamma,
                                   teacher_semantics, teacher_trajectory, kwargs)

    # ------------------------------------------------------------------------------------------------------------
    # The forward's parts, in the order it calls them
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_request(output_latent_states, teacher_semantics, pixel_values, mm_token_type_ids, position_ids):
        """`output_latent_states` as the forward reads it (True when `teacher_semantics` asks for L_concept); refuses
        the requests that cannot work."""
        if teacher_semantics is not None and output_latent_states is False:
            raise ValueError("teacher_semantics needs the latent states; leave output_latent_states unset.")
        if pixel_values is not None and mm_token_type_ids is None and position_ids is None:
            # Without them Qwen2.5-VL falls back to 1D positions for the image silently: different logits, no error.
            raise ValueError(
                "pixel_values came without mm_token_type_ids (or position_ids), so the image tokens would get plain "
                "1D RoPE positions instead of Qwen2.5-VL's 3D ones. Pass the processor's mm_token_type_ids along "
                "(a collator must keep it)."
            )
        return True if teacher_semantics is not None else output_latent_states

    def _find_latent_block(self, input_ids, past_length, output_latent_states, output_latent_attention, gamma,
                           latent_intervention) -> LatentBlock:
        """Where each sample's latent block is, searched only when something latent is asked for or the gate is
        closing. Strict there (a malformed block, or a batch mixing samples with and without one, is an error); plain
        inference (`output_latent_states=None`) reads such a batch as "no latent outputs" (e.g. a pass without a KV
        cache over latent tokens the model wrote itself)."""
        config = self.config
        # A decoding step (a cache behind it) holds no latent block unless asked for something latent; skip the search.
        decoding_plainly = past_length > 0 and output_latent_states is None and latent_intervention is None
        closing = gamma < 1.0
        wants = not decoding_plainly and (
            output_latent_states is not False or output_latent_attention or closing or latent_intervention is not None
        )
        strict = bool(output_latent_states) or output_latent_attention or closing or latent_intervention is not None
        index = present = None
        if wants and input_ids is not None:
            if config.latent_token_ids is None:
                raise ValueError(
                    "config.latent_token_ids is not set, so the latent tokens cannot be found; convert the checkpoint "
                    "with convert_qwen2_5_vl_to_lavit."
                )
            index, present = find_latent_tokens(input_ids, config.latent_token_ids, strict)  # (B, K), (B,)
        if (output_latent_states or output_latent_attention or closing) and input_ids is None:
            raise ValueError(
                "LaViT locates the image and latent tokens in input_ids; pass input_ids (not only inputs_embeds) when "
                "the sensory gate is below 1 or latent outputs are requested."
            )
        required = bool(output_latent_states) or output_latent_attention
        if present is not None and required and not bool(present.all()):
            sample = int((~present).nonzero()[0, 0])
            raise ValueError(
                f"Latent outputs were requested but sample {sample} has no latent tokens "
                f"{config.latent_tokens}; build the prompt with LavitProcessor (add_latent_tokens=True) or "
                "to_prompt_completion(..., use_latent_tokens=True)."
            )
        if present is not None and output_latent_states is None and bool(present.any()) and strict:
            if not bool(present.all()):
                sample = int((~present).nonzero()[0, 0])
                raise ValueError(
                    f"Sample {sample} has no latent tokens while others in the batch do; batch samples of one kind "
                    "(all with or all without the latent block)."
                )
        every = present is not None and bool(present.all())
        return LatentBlock(index, present, every, every and output_latent_states is not False)

    def _attention_control(self, input_ids, inputs_embeds, attention_mask, latents: LatentBlock, gamma: float,
                           output_latent_attention: bool, latent_intervention, latent_positions, past_length: int,
                           supplied) -> tuple[LavitAttentionControl | None, AttentionCapture | None]:
        """The `LavitAttentionControl` this forward needs (the gate's rows and columns, the latent tokens' capture,
        the masked mode's blocked keys), or None when plain sdpa does; and the capture. A caller's own control
        (`supplied`) is kept, and learns the masked mode's blocking."""
        config = self.config
        control_gate = gamma < 1.0
        image_keys = capture = None
        if control_gate or output_latent_attention:
            if past_length > 0:
                raise ValueError(
                    "The sensory gate and latent attention work on full (teacher-forced) passes, not on decoding steps "
                    "with a KV cache; set model.set_sensory_gate(1.0) and output_latent_attention=False to generate."
                )
            self._check_text_attention("The sensory gate or latent attention")
            image_keys = input_ids == config.image_token_id  # (B, L)
        if output_latent_attention and supplied is not None:
            raise ValueError("Pass either output_latent_attention/teacher_trajectory or your own lavit_control, not both.")
        if output_latent_attention:
            capture = self._latent_capture(input_ids, latents.index)
        log_gate = gated_queries = None
        if control_gate:
            if not bool(latents.present.all()):
                sample = int((~latents.present).nonzero()[0, 0])
                raise ValueError(
                    f"The sensory gate is {gamma} < 1 but sample {sample} has no latent tokens, so its answer would "
                    "lose the image with nothing to route through; gate only LaViT samples (Naive SFT keeps gamma = 1)."
                )
            gated_queries = self._gated_queries(input_ids, attention_mask, image_keys, latents.index)
            log_gate = math.log(gamma) if gamma > 0 else float("-inf")
        if latent_intervention is not None:
            if latent_intervention not in LATENT_INTERVENTIONS:
                raise ValueError(f"latent_intervention must be one of {LATENT_INTERVENTIONS}, got {latent_intervention!r}.")
            if control_gate:
                raise ValueError("Latent interventions are inference ablations; open the gate (set_sensory_gate(1.0)).")
        blocked_keys = blocked_after = None
        if latent_intervention == "masked":
            blocked_keys, blocked_after = self._blocked_latent_keys(latents, latent_positions, past_length, input_ids,
                                                                    inputs_embeds)
        if supplied is not None and blocked_keys is not None:  # a caller's capture sees the masked mode's blocking
            supplied.blocked_keys, supplied.blocked_after = blocked_keys, blocked_after
        if supplied is None and (control_gate or capture is not None or blocked_keys is not None):
            control = LavitAttentionControl(log_gate, gated_queries, image_keys, capture, blocked_keys=blocked_keys,
                                            blocked_after=blocked_after)
            return control, capture
        return None, capture

    def _latent_capture(self, input_ids, latent_index) -> AttentionCapture:
        """The capture of the latent rows over the image tokens; every sample needs exactly one image."""
        image_token_id = self.config.image_token_id
        images = count_images(input_ids, image_token_id)  # (B,)
        if bool((images == 0).any()):
            sample = int((images == 0).nonzero()[0, 0])
            raise ValueError(
                f"Latent attention was requested but sample {sample} has no image; every sample needs one image."
            )
        if bool((images > 1).any()):
            sample = int((images > 1).nonzero()[0, 0])
            raise ValueError(
                f"Sample {sample} has {int(images[sample])} images: latent attention over several images is "
                "unsupported (the trajectory target is one image's token grid); use one image per sample."
            )
        return image_attention_capture(input_ids, image_token_id, latent_index,
                                       layers=self.config.latent_layer_indices())

    def _blocked_latent_keys(self, latents: LatentBlock, latent_positions, past_length, input_ids, inputs_embeds):
        """The masked mode's `(blocked_keys (B, L_k), blocked_after (B,))`: no query after the latent block sees it."""
        positions = latent_positions
        if positions is None:
            if not latents.every:
                raise ValueError(
                    "The masked latent mode needs the latent positions: every sample must hold the latent block, "
                    "and decoding steps need latent_positions= (the prompt's, from find_latent_tokens)."
                )
            positions = latents.index
        positions = positions.to(self.device)
        self._check_text_attention("The masked latent mode")
        width = past_length + (input_ids.shape[1] if input_ids is not None else inputs_embeds.shape[1])
        blocked_keys = torch.zeros(positions.shape[0], width, dtype=torch.bool, device=positions.device)
        blocked_keys.scatter_(1, positions, True)
        return blocked_keys, positions[:, -1]

    def _intervene(self, latent_intervention, latents: LatentBlock, input_ids, inputs_embeds):
        """The zeroed mode's input embeddings and the shuffled mode's layer hooks (removed after the pass)."""
        hooks = []
        if latent_intervention == "zeroed" and latents.every:
            inputs_embeds = self.get_input_embeddings()(input_ids)
            keep = torch.ones_like(input_ids, dtype=inputs_embeds.dtype).scatter(1, latents.index, 0.0)
            inputs_embeds = inputs_embeds * keep[:, :, None]  # the latent rows are zero
        if latent_intervention == "shuffled" and latents.every:
            hooks = self._shuffle_latent_states(latents.index)
        return inputs_embeds, hooks

    def _lavit_outputs(self, outputs, labels, logits_to_keep, return_logits, latents: LatentBlock, capture, gamma,
                       teacher_semantics, teacher_trajectory, loss_kwargs) -> LavitCausalLMOutputWithPast:
        """The base model's outputs with the next-token loss, the latent states, the latent attention and the two
        distillation losses."""
        hidden_states = outputs.last_hidden_state  # (B, L, D)
        loss = logits = None
        statistics = (None, None, None)
        token_loss_type = loss_kwargs.pop("token_loss_type", "nll")
        if return_logits:
            logits = self.lm_head(slice_logits_to_keep(hidden_states, logits_to_keep))
            if labels is not None:
                loss = self.loss_function(
                    logits=logits, labels=labels, vocab_size=self.config.text_config.vocab_size, **loss_kwargs
                )
        elif labels is not None:
            loss, *statistics = labelled_token_outputs(self.lm_head, hidden_states, labels,
                                                       loss_kwargs.get("num_items_in_batch"), loss_type=token_loss_type)

        latent_hidden_states = concept_embeds = None
        if latents.compute:
            width = hidden_states.shape[-1]
            latent_hidden_states = hidden_states.gather(1, latents.index[:, :, None].expand(-1, -1, width))  # (B,K,D)
            concept_embeds = self.concept_head(latent_hidden_states[:, -1])  # (B, teacher_hidden_size)

        latent_image_attention = image_mask = None
        if capture is not None:
            attention = capture.mean_over_layers()  # (B, K, N)
            latent_image_attention = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
            image_mask = capture.key_mask  # (B, N)

        concept = trajectory = None
        if teacher_semantics is not None:
            concept = concept_loss(concept_embeds, teacher_semantics.to(concept_embeds.device))
        if teacher_trajectory is not None:
            trajectory = trajectory_loss(
                teacher_trajectory.to(latent_image_attention.device), latent_image_attention, image_mask
            )
        return LavitCausalLMOutputWithPast(
            loss=loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            image_outputs=outputs.image_outputs,
            video_outputs=outputs.video_outputs,
            latent_hidden_states=latent_hidden_states,
            concept_embeds=concept_embeds,
            latent_image_attention=latent_image_attention,
            image_token_mask=image_mask,
            concept_loss=concept,
            trajectory_loss=trajectory,
            sensory_gate=gamma,
            label_count=statistics[0],
            label_entropy_sum=statistics[1],
            label_top1_count=statistics[2],
        )

    @staticmethod
    def _traceable_latent_request(output_latent_states, output_latent_attention, gamma, latent_intervention):
        """Under torch.compile: the plain forward (gate open, nothing latent requested) is one graph, and the
        default `output_latent_states=None` reads as False there. What needs the latent and image positions found
        in input_ids (their values) raises, naming the argument: under `fullgraph=True` that error reaches the
        caller; without it dynamo runs LaViT's outer forward eagerly and still compiles the language model."""
        asked = [
            name
            for name, on in (
                ("output_latent_states=True (or teacher_semantics)", bool(output_latent_states)),
                ("output_latent_attention=True (or teacher_trajectory)", output_latent_attention),
                (f"a sensory gate below 1 (gamma = {gamma:g})", gamma < 1.0),
                (f"latent_intervention={latent_intervention!r}", latent_intervention is not None),
            )
            if on
        ]
        if asked:
            raise ValueError(
                f"{' and '.join(asked)} cannot be traced into one graph: it needs where the latent and image tokens "
                "sit in input_ids, and a graph compiled with torch.compile(..., fullgraph=True) cannot depend on "
                "tensor values. Compile without fullgraph=True (graph breaks allowed), or compile the plain "
                "inference forward only (model.set_sensory_gate(1.0), no latent outputs requested)."
            )
        return False

    def _shuffle_latent_states(self, latent_index: torch.Tensor) -> list:
        """Forward hooks that, at the output of every text layer, give each sample the hidden states of the next
        sample (cyclically) at its latent positions; the caller removes them after the pass."""
        batch = latent_index.shape[0]
        if batch < 2:
            raise ValueError("The shuffled latent mode swaps latent states between samples: use a batch of at least 2.")
        source = torch.roll(torch.arange(batch, device=latent_index.device), -1)  # sample b reads sample b + 1

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output  # (B, L, D)
            width = hidden.shape[-1]
            index = latent_index.to(hidden.device)[:, :, None].expand(-1, -1, width)  # (B, K, D)
            donor = hidden.gather(1, index)[source.to(hidden.device)]  # (B, K, D)
            hidden = hidden.scatter(1, index, donor)
            return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

        return [layer.register_forward_hook(hook) for layer in self.model.language_model.layers]

    def _gated_queries(self, input_ids, attention_mask, image_keys, latent_index) -> torch.Tensor:
        """The query rows the gate restrains, `(B, L)` bool, by `config.gate_scope`."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)[None, :]  # (1, L)
        is_latent = torch.zeros_like(image_keys)
        is_latent.scatter_(1, latent_index, True)
        if self.config.gate_scope == "after_image":
            after_image = image_keys.cumsum(dim=1) > 0
            gated = after_image & ~image_keys & ~is_latent
        else:  # "response": the tokens after the latent block
            gated = positions > latent_index[:, -1:]
            gated = gated & ~image_keys
        if attention_mask is not None and attention_mask.ndim == 2:
            gated = gated & attention_mask.bool()
        return gated


# The Auto classes a converted checkpoint's auto_map names, registered on import (see configuration_lavit).
AutoModelForImageTextToText.register(LavitConfig, LavitForConditionalGeneration, exist_ok=True)
AutoModel.register(LavitConfig, LavitForConditionalGeneration, exist_ok=True)


__all__ = [
    "LavitForConditionalGeneration",
    "LavitCausalLMOutputWithPast",
    "LavitAttentionControl",
    "AttentionCapture",
    "enable_lavit_attention",
    "model_device",
    "image_attention_capture",
    "concept_loss",
    "trajectory_loss",
    "labelled_token_loss",
    "labelled_token_outputs",
    "summed_token_loss",
    "token_statistics",
    "TOKEN_LOSS_TYPES",
    "find_latent_tokens",
    "padded_positions",
    "count_images",
    "LAVIT_ATTENTION",
]
