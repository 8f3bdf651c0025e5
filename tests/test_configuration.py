"""LavitConfig: defaults, round trip and every ValueError."""

from __future__ import annotations


import pytest

from configuration_lavit import LavitConfig


TINY = dict(
    text_config=dict(
        vocab_size=100,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        rope_parameters={"rope_type": "default", "mrope_section": [2, 1, 1]},
        bos_token_id=None,
        eos_token_id=1,
        pad_token_id=0,
    ),
    vision_config=dict(depth=1, hidden_size=16, num_heads=2, out_hidden_size=32, intermediate_size=32),
    image_token_id=90,
    video_token_id=91,
    vision_start_token_id=92,
    vision_end_token_id=93,
)


def test_defaults_follow_the_paper():
    config = LavitConfig(**TINY)
    assert config.model_type == "lavit"
    assert config.num_latent_tokens == 4
    assert config.latent_tokens == ["<v-trace1>", "<v-trace2>", "<v-trace3>", "<v-trace4>"]
    assert config.teacher_hidden_size == 5120
    assert config.concept_head_hidden_size == 32  # the text hidden size
    assert config.gate_scope == "after_image"
    assert config.latent_layer_indices() == [0, 1, 2]


def test_round_trip(tmp_path):
    config = LavitConfig(**TINY, num_latent_tokens=6, latent_token_ids=[94, 95, 96, 97, 98, 99], gate_scope="response",
                         latent_attention_layers=[2, 0], teacher_hidden_size=64)
    config.save_pretrained(tmp_path)
    loaded = LavitConfig.from_pretrained(tmp_path)
    for name in ("num_latent_tokens", "latent_token_ids", "gate_scope", "latent_attention_layers", "teacher_hidden_size",
                 "concept_head_hidden_size", "latent_token_template"):
        assert getattr(loaded, name) == getattr(config, name)
    assert loaded.latent_layer_indices() == [0, 2]
    assert loaded.text_config.hidden_size == 32


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(num_latent_tokens=0), "num_latent_tokens must be at least 1"),
        (dict(num_latent_tokens=2.5), "num_latent_tokens must be an integer"),
        (dict(latent_token_template="<v-trace>"), "exactly once"),
        (dict(latent_token_template="<{index}-{index}>"), "exactly once"),
        (dict(latent_token_template="<{name}{index}>"), "cannot be formatted"),
        (dict(latent_token_template="[lat{index}]"), None),
        (dict(latent_token_ids=[94, 95, 96]), "has 3 ids but num_latent_tokens is 4"),
        (dict(latent_token_ids=[94, 94, 95, 96]), "must be distinct"),
        (dict(latent_token_ids=[94, 95, 96, 100]), "outside the vocabulary"),
        (dict(latent_token_ids=[90, 95, 96, 97]), "reuse vision special token ids"),
        (dict(teacher_hidden_size=0), "teacher_hidden_size must be positive"),
        (dict(concept_head_hidden_size=-1), "concept_head_hidden_size must be positive"),
        (dict(gate_scope="question"), "gate_scope must be one of"),
        (dict(latent_attention_layers="first"), "must be one of .*'last_<n>'"),
        (dict(latent_attention_layers="last_0"), r"names no layer; use .last_<n>. with n >= 1"),
        (dict(latent_attention_layers="last_4"), r"last 4 layers of a 3-layer"),
        (dict(latent_attention_layers=2), "a name .* or a list of layer"),
        (dict(latent_attention_layers=[]), "empty list"),
        (dict(latent_attention_layers=[0, 3]), r"\[3\] are outside \[0, 3\)"),
        (dict(latent_attention_layers=[0.5]), "integer layer indices"),
    ],
)
def test_invalid_fields_raise_with_a_fix(overrides, message):
    if message is None:  # a valid template of another spelling
        assert LavitConfig(**TINY, **overrides).latent_tokens[0] == "[lat1]"
        return
    with pytest.raises(ValueError, match=message):
        LavitConfig(**TINY, **overrides)


@pytest.mark.parametrize(
    "layers, expected",
    [("all", [0, 1, 2]), ("last_half", [1, 2]), ("last", [2]), ("last_2", [1, 2]), ("last_3", [0, 1, 2]),
     ([2, 0, 2], [0, 2])],
)
def test_latent_attention_layers_named_and_relative_forms(layers, expected):
    config = LavitConfig(**TINY, latent_attention_layers=layers)
    assert config.latent_layer_indices() == expected
    # the relative forms follow the depth: the same name on a deeper model names its own last layers
    from configuration_lavit import resolve_latent_layers

    assert resolve_latent_layers("last_half", 36) == list(range(18, 36))
    assert resolve_latent_layers("last_half", 2) == [1]
    assert resolve_latent_layers("last_4", 36) == [32, 33, 34, 35]
    # and survive a save/load round trip as written
    assert LavitConfig.from_dict(config.to_dict()).latent_attention_layers == layers


@pytest.mark.parametrize("text, expected", [("all", "all"), ("last_half", "last_half"), ("last_3", "last_3"),
                                            ("2", [2]), ("0, 3", [0, 3])])
def test_command_line_layer_settings_parse(text, expected):
    from configuration_lavit import parse_latent_layers

    assert parse_latent_layers(text) == expected


@pytest.mark.parametrize("text, message", [("last-half", "must be one of"), ("middle", "must be one of"),
                                           ("last_0", "names no layer"), ("1,x", "must be one of")])
def test_command_line_layer_settings_refused_before_any_loading(text, message, tmp_path):
    from configuration_lavit import parse_latent_layers

    with pytest.raises(ValueError, match=message):
        parse_latent_layers(text)
    # the conversion script refuses it while parsing its arguments, before it loads any weights
    import convert_qwen2_5_vl

    with pytest.raises(SystemExit):
        convert_qwen2_5_vl.parse_args(["--base", str(tmp_path / "absent"), "--output-dir", str(tmp_path / "out"),
                                       "--latent-attention-layers", text])

