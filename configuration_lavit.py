# Copyright 2026 The LaViT developers. Licensed under the Apache License, Version 2.0.
"""Configuration of LaViT: a Qwen2.5-VL model that thinks in K latent visual tokens before it answers.

This file is remote code: it imports only `transformers` so that a checkpoint loads with
`trust_remote_code=True` on a machine that has nothing else of this project installed.
"""

from transformers import AutoConfig, Qwen2_5_VLConfig


GATE_SCOPES = ("after_image", "response")
# The named readings of `latent_attention_layers`; "last_<n>" (e.g. "last_4") names the last n layers.
LATENT_LAYER_NAMES = ("all", "last_half", "last")


LATENT_TOKEN_TEMPLATE = "<v-trace{index}>"  # the paper's spelling


def latent_token_strings(num_latent_tokens: int, template: str = LATENT_TOKEN_TEMPLATE) -> list[str]:
    """The K latent token strings, `template` formatted with index 1..K (paper: `<v-trace1>` ... `<v-trace4>`)."""
    return [template.format(index=i) for i in range(1, num_latent_tokens + 1)]


class LavitConfig(Qwen2_5_VLConfig):
    r"""
    Configuration of [`LavitForConditionalGeneration`]: every field of [`Qwen2_5_VLConfig`] plus the LaViT fields
    below (paper sections 4.2 and C.2). A checkpoint made by `convert_qwen2_5_vl_to_lavit` fills `latent_token_ids`.

    Args:
        num_latent_tokens (`int`, *optional*, defaults to 4):
            K, the number of latent visual tokens the model writes before its answer (paper: K = 4; Table A2
            ablates 4, 6 and 8).
        latent_token_template (`str`, *optional*, defaults to `"<v-trace{index}>"`):
            How the latent tokens are spelled; `{index}` runs from 1 to K, giving the paper's names
            `<v-trace1>` ... `<v-traceK>`.
        latent_token_ids (`list[int]`, *optional*):
            The vocabulary ids of the K latent tokens, in order. Filled at conversion; `None` in a configuration
            that has not been attached to a tokenizer yet.
        teacher_hidden_size (`int`, *optional*, defaults to 5120):
            The width of the teacher's visual semantics V_sem, i.e. the output width of the concept head
            (5120 for the paper's Qwen2.5-VL-32B teacher).
        concept_head_hidden_size (`int`, *optional*):
            The hidden width of the concept projection head phi_mlp (Linear -> GELU -> Linear, equation 6).
            Defaults to the text model's hidden size.
        gate_scope (`str`, *optional*, defaults to `"after_image"`):
            Which query rows the curriculum sensory gate (equation 4) restrains from the image keys.
            `"after_image"`: every non-latent token after the first image token (the official code's bottleneck;
            it also closes the path from the image through the question tokens to the answer).
            `"response"`: only the tokens after the latent block, the paper's equation 4 read literally.
        latent_attention_layers (`str` or `list[int]`, *optional*, defaults to `"all"`):
            The text layers whose attention the latent tokens' image attention (A_student, equation 7) is averaged
            over, i.e. where the trajectory loss reads it. `"all"`: every layer, the paper's reading. A relative
            form that follows the depth of the model: `"last_half"` (the last `ceil(L / 2)` of L layers),
            `"last"` (the last layer) or `"last_<n>"` (the last n layers, e.g. `"last_4"`). Or a list of layer
            indices in `[0, num_hidden_layers)`. Why not always all: in the first layer a latent token's query is
            a function of its own embedding and position only, so its attention over the image cannot depend on
            the question, while the teacher's gaze does; averaging over every layer asks that layer for a target
            it cannot reach. With 36 layers (3B) that layer is 1/36 of the average; with 2 it is half of it.
    """

    model_type = "lavit"

    num_latent_tokens: int = 4
    latent_token_template: str = LATENT_TOKEN_TEMPLATE
    latent_token_ids: list[int] | None = None
    teacher_hidden_size: int = 5120
    concept_head_hidden_size: int | None = None
    gate_scope: str = "after_image"
    latent_attention_layers: str | list[int] = "all"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.concept_head_hidden_size is None:
            self.concept_head_hidden_size = self.text_config.hidden_size
        self._validate_lavit_fields()

    @property
    def latent_tokens(self) -> list[str]:
        """The K latent token strings, e.g. `['<v-trace1>', ..., '<v-trace4>']`."""
        return latent_token_strings(self.num_latent_tokens, self.latent_token_template)

    def latent_layer_indices(self) -> list[int]:
        """The text-layer indices that `latent_image_attention` is averaged over."""
        return resolve_latent_layers(self.latent_attention_layers, self.text_config.num_hidden_layers)

    def _validate_lavit_fields(self) -> None:
        for name in ("num_latent_tokens", "teacher_hidden_size", "concept_head_hidden_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be an integer, got {value!r} ({type(value).__name__}).")
        if self.num_latent_tokens < 1:
            raise ValueError(
                f"num_latent_tokens must be at least 1, got {self.num_latent_tokens}; the paper uses 4 "
                "(set num_latent_tokens=4)."
            )
        if self.latent_token_template.count("{index}") != 1:
            raise ValueError(
                f"latent_token_template must contain '{{index}}' exactly once, got {self.latent_token_template!r}; "
                "use e.g. '<v-trace{index}>'."
            )
        try:
            tokens = self.latent_tokens
        except (KeyError, IndexError, ValueError) as err:
            raise ValueError(
                f"latent_token_template {self.latent_token_template!r} cannot be formatted with index=1..K ({err}); "
                "use a template whose only placeholder is '{index}', e.g. '<v-trace{index}>'."
            ) from err
        if any(not token.strip() for token in tokens) or len(set(tokens)) != len(tokens):
            raise ValueError(
                f"latent_token_template {self.latent_token_template!r} gives blank or repeated tokens {tokens}; use "
                "e.g. '<v-trace{index}>'."
            )
        if self.latent_token_ids is not None:
            ids = list(self.latent_token_ids)
            if len(ids) != self.num_latent_tokens:
                raise ValueError(
                    f"latent_token_ids has {len(ids)} ids but num_latent_tokens is {self.num_latent_tokens}; "
                    "re-run convert_qwen2_5_vl_to_lavit with the K you want, which adds the tokens and fills the ids."
                )
            if len(set(ids)) != len(ids):
                raise ValueError(f"latent_token_ids must be distinct, got {ids}; each latent token needs its own id.")
            vocab_size = self.text_config.vocab_size
            if any(not 0 <= i < vocab_size for i in ids):
                raise ValueError(
                    f"latent_token_ids {ids} fall outside the vocabulary [0, {vocab_size}); resize the embeddings "
                    "(convert_qwen2_5_vl_to_lavit does it) or fix the ids."
                )
            reserved = {self.image_token_id, self.video_token_id, self.vision_start_token_id, self.vision_end_token_id}
            if reserved & set(ids):
                raise ValueError(
                    f"latent_token_ids {ids} reuse vision special token ids {sorted(reserved & set(ids))}; "
                    "the latent tokens must be new tokens of their own."
                )
        if self.teacher_hidden_size < 1:
            raise ValueError(
                f"teacher_hidden_size must be positive, got {self.teacher_hidden_size}; use the teacher's text hidden "
                "size (5120 for Qwen2.5-VL-32B, 3584 for 7B)."
            )
        if self.concept_head_hidden_size < 1:
            raise ValueError(
                f"concept_head_hidden_size must be positive, got {self.concept_head_hidden_size}; leave it unset to "
                "use the text hidden size."
            )
        if self.gate_scope not in GATE_SCOPES:
            raise ValueError(f"gate_scope must be one of {GATE_SCOPES}, got {self.gate_scope!r}.")
        resolve_latent_layers(self.latent_attention_layers, self.text_config.num_hidden_layers)


def _last_count(name: str) -> int | None:
    """How many last layers a named setting reads (None for "all" and "last_half", which depend on the depth); a
    `ValueError` naming the forms for anything else."""
    if name in ("all", "last_half"):
        return None
    if name == "last":
        return 1
    if not (name.startswith("last_") and name[len("last_"):].isdigit()):
        raise ValueError(
            f"latent_attention_layers must be one of {LATENT_LAYER_NAMES}, 'last_<n>' (e.g. 'last_4') or a list of "
            f"layer indices (comma-separated on a command line, e.g. '2,3'), got {name!r}."
        )
    count = int(name[len("last_"):])
    if count < 1:
        raise ValueError(f"latent_attention_layers={name!r} names no layer; use 'last_<n>' with n >= 1, or 'all'.")
    return count


def parse_latent_layers(value):
    """A `latent_attention_layers` value as written on a command line: `"2,3"` becomes `[2, 3]`, a name stays as it
    is; a string that is neither raises a `ValueError` (the depth is checked by `resolve_latent_layers`)."""
    if isinstance(value, str) and value and all(part.strip().isdigit() for part in value.split(",")):
        return [int(part) for part in value.split(",")]
    if isinstance(value, str):
        _last_count(value)
    return value


def resolve_latent_layers(layers, num_layers: int) -> list[int]:
    """The sorted layer indices that a `latent_attention_layers` value names in a `num_layers`-layer text model
    (see `LavitConfig`); a clear `ValueError` for anything else."""
    if isinstance(layers, str):
        count = _last_count(layers)
        if layers == "all":
            return list(range(num_layers))
        if layers == "last_half":
            return list(range(num_layers // 2, num_layers))
        if count > num_layers:
            raise ValueError(
                f"latent_attention_layers={layers!r} asks for the last {count} layers of a {num_layers}-layer text "
                f"model; use 'last_<n>' with 1 <= n <= {num_layers}, or 'all'."
            )
        return list(range(num_layers - count, num_layers))
    if isinstance(layers, (int, float)) or not hasattr(layers, "__iter__"):
        raise ValueError(
            f"latent_attention_layers must be a name ({', '.join(LATENT_LAYER_NAMES)}, 'last_<n>') or a list of layer "
            f"indices, got {layers!r}."
        )
    layers = list(layers)
    if any(isinstance(i, bool) or not isinstance(i, int) for i in layers):
        raise ValueError(f"latent_attention_layers must hold integer layer indices, got {layers!r}.")
    if len(layers) == 0:
        raise ValueError("latent_attention_layers is an empty list; give at least one layer index or 'all'.")
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(
            f"latent_attention_layers {bad} are outside [0, {num_layers}) for this {num_layers}-layer text "
            "model; use indices in range, 'all' or a relative form such as 'last_half'."
        )
    return sorted(set(layers))


# Known to transformers' Auto classes once imported (a checkpoint's auto_map does the same for remote code), so that
# AutoConfig.for_model("lavit") and code that consults the mappings know LaViT. exist_ok: remote code loaded later
# registers its own copy of the class under the same name.
AutoConfig.register(LavitConfig.model_type, LavitConfig, exist_ok=True)


__all__ = ["LavitConfig", "latent_token_strings", "LATENT_TOKEN_TEMPLATE", "parse_latent_layers", "resolve_latent_layers"]
