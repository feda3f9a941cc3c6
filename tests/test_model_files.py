"""Every file a model folder is read from names itself in its error: malformed json (config, processor configs,
tokenizer side files), an unreadable tokenizer.json, and a config field of the wrong json type (named with its
section), instead of a bare JSONDecodeError, a tokenizers Exception or a TypeError deep in the model."""
import json
import os
import re
import shutil

import pytest

import model
from data_paths import fixture_dirs

JANUS, SHOWO = fixture_dirs("janus")[0], fixture_dirs("showo")[0]


def copy(folder, tmp_path, *names):
    """Only the named files of a fixture folder (loading fails before it would need the rest)."""
    for name in names:
        shutil.copy(os.path.join(folder, name), tmp_path / name)
    return tmp_path


def edit_json(path, change):
    data = json.load(open(path))
    change(data)
    json.dump(data, open(path, "w"))


@pytest.mark.parametrize("folder", [JANUS, SHOWO], ids=os.path.basename)
def test_a_malformed_config_json_is_named(folder, tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "multi_modality",')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: malformed json")):
        model.load_model(str(tmp_path))
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: expected a json object")):
        model.load_model(str(tmp_path))


@pytest.mark.parametrize("section, key, value", [("language_config", "hidden_size", "64"),
                                                 ("language_config", "rms_norm_eps", "1e-6"),
                                                 ("vision_config.params", "width", 64.5),
                                                 ("gen_vision_config.params", "ch_mult", [1, "1", 2]),
                                                 ("aligner_config.params", "depth", True)])
def test_a_janus_config_field_of_the_wrong_type_is_named(tmp_path, section, key, value):
    copy(JANUS, tmp_path, "config.json")

    def change(cfg):
        node = cfg
        for part in section.split("."):
            node = node[part]
        node[key] = value
    edit_json(tmp_path / "config.json", change)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: {section}.{key} must be")):
        model.read_janus_checkpoint(str(tmp_path))


@pytest.mark.parametrize("key, value", [("num_vq_tokens", "16"), ("llm_config.hidden_size", 64.0),
                                        ("w_clip_vit", "false")])
def test_a_showo_config_field_of_the_wrong_type_is_named(tmp_path, key, value):
    copy(SHOWO, tmp_path, "config.json")
    section, _, name = key.rpartition(".")
    edit_json(tmp_path / "config.json", lambda cfg: (cfg[section] if section else cfg).__setitem__(name, value))
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'config.json'}: {key} must be")):
        model.ShowOConfig.from_json(str(tmp_path / "config.json"))


def test_a_magvit_config_is_named(tmp_path):
    path = copy(SHOWO, tmp_path, "magvit_config.json") / "magvit_config.json"
    edit_json(path, lambda cfg: cfg["encoder"].__setitem__("ch", "32"))
    with pytest.raises(ValueError, match=re.escape(f"{path}: encoder.ch must be")):
        model.MagvitConfig.from_json(str(path))
    path.write_text("{")
    with pytest.raises(ValueError, match=re.escape(f"{path}: malformed json")):
        model.MagvitConfig.from_json(str(path))


@pytest.mark.parametrize("folder", [JANUS, SHOWO], ids=os.path.basename)
def test_an_unreadable_tokenizer_json_is_named(folder, tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": ')
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer.json'}: not a readable tokenizer")):
        if folder == JANUS:
            model.JanusProcessor(str(tmp_path), model.JANUS_CONFIGS["janus-pro-1b"])
        else:
            model.ShowOTokenizer(str(tmp_path))


@pytest.mark.parametrize("name, text, message", [
    ("preprocessor_config.json", "{", "malformed json"),
    ("preprocessor_config.json", '{"image_size": "384"}', "image_size must be"),
    ("preprocessor_config.json", '{"image_mean": [0.5, "0.5", 0.5]}', "image_mean must be"),
    ("processor_config.json", '{"system_prompt": ', "malformed json"),
    ("processor_config.json", '{"system_prompt": 3}', "system_prompt must be")])
def test_janus_processor_configs_are_named(tmp_path, name, text, message):
    copy(JANUS, tmp_path, "tokenizer.json")
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / name}: {message}")):
        model.JanusProcessor(str(tmp_path), model.JANUS_CONFIGS["janus-pro-1b"])


@pytest.mark.parametrize("text, message", [("{", "malformed json"), ('{"bos_token": {"id": 3}}', "bos_token must be")])
def test_showo_tokenizer_side_files_are_named(tmp_path, text, message):
    copy(SHOWO, tmp_path, "tokenizer.json")
    (tmp_path / "tokenizer_config.json").write_text(text)
    with pytest.raises(ValueError, match=re.escape(f"{tmp_path / 'tokenizer_config.json'}: {message}")):
        model.ShowOTokenizer(str(tmp_path))


def test_the_fixtures_still_load(tmp_path):
    """The checks accept what real and fixture folders hold (ints where floats are expected, lists for tuples)."""
    for folder in (JANUS, SHOWO):
        model.load_model(folder)
