"""Janus checkpoint loading: full-size names and shapes (meta device), every file layout, the transformers layout,
and one clear error for every kind of broken checkpoint."""
import glob
import json
import os
import re
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import model

from data_paths import fixture_dirs, key_file

JANUS_DIRS = fixture_dirs("janus")


def key_list(name):
    """spec/keys/<name>.txt -> {tensor name: shape}"""
    out = {}
    for line in open(key_file(name + ".txt")):
        key, shape, _ = line.rstrip("\n").split("\t")
        out[key] = torch.Size(json.loads(shape))
    return out


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_full_size_original_layout_names_and_shapes(size):
    m = model.build_on_meta(model.Janus, model.JANUS_CONFIGS[f"janus-pro-{size}"])
    got = {k: v.shape for k, v in m.state_dict().items()}
    assert got == key_list(f"janus_pro_{size}_original")


@pytest.mark.parametrize("size", ["1b", "7b"])
def test_full_size_hf_layout_maps_onto_the_model(size):
    hf = {k: torch.empty(s, device="meta") for k, s in key_list(f"janus_pro_{size}_hf").items()}
    mapped = {k: v.shape for k, v in model.janus_hf_to_original(hf).items()}
    original = {k: s for k, s in key_list(f"janus_pro_{size}_original").items() if not k.startswith(model.JANUS_UNUSED)}
    assert mapped == original
    m = model.build_on_meta(model.Janus, model.JANUS_CONFIGS[f"janus-pro-{size}"])
    optional = [k for k in m.state_dict() if k.startswith(model.JANUS_UNUSED)]
    model.load_strict(m, model.janus_hf_to_original(hf), optional, device="meta")  # strict: raises on any mismatch


def test_janus_1_3b_uses_plain_roles():
    cfg = model.JANUS_CONFIGS["janus-1.3b"]
    assert (cfg.user_role, cfg.assistant_role) == ("User", "Assistant")
    assert model.JANUS_CONFIGS["janus-pro-1b"].user_role == "<|User|>"


# --- the forward (original -> transformers) rules of janus.md section 7, written independently of model.py ---
FORWARD = [
    (r"^vision_model\.vision_tower\.patch_embed\.proj\.", "model.vision_model.embeddings.patch_embedding."),
    (r"^vision_model\.vision_tower\.pos_embed$", "model.vision_model.embeddings.position_embedding.weight"),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.norm(\d)\.", r"model.vision_model.encoder.layers.\1.layer_norm\2."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.proj\.", r"model.vision_model.encoder.layers.\1.self_attn.projection_layer."),
    (r"^vision_model\.vision_tower\.blocks\.(\d+)\.mlp\.", r"model.vision_model.encoder.layers.\1.mlp."),
    (r"^vision_model\.vision_tower\.norm\.", "model.vision_model.post_layernorm."),
    (r"^aligner\.layers\.0\.", "model.aligner.fc1."), (r"^aligner\.layers\.2\.", "model.aligner.hidden_layers.0."),
    (r"^gen_aligner\.layers\.0\.", "model.generation_aligner.fc1."),
    (r"^gen_aligner\.layers\.2\.", "model.generation_aligner.hidden_layers.0."),
    (r"^gen_head\.output_mlp_projector\.", "model.generation_head.proj_out."),
    (r"^gen_head\.vision_head\.", "model.generation_head.vision_head."),
    (r"^gen_embed\.", "model.generation_embeddings."),
    (r"^gen_vision_model\.", "model.vqmodel."),
    (r"encoder\.conv_blocks\.", "encoder.down."), (r"decoder\.conv_blocks\.", "decoder.up."),
    (r"\.res\.(\d+)\.", r".block.\1."),
    (r"\.mid\.0\.", ".mid.block_1."), (r"\.mid\.1\.", ".mid.attn_1."), (r"\.mid\.2\.", ".mid.block_2."),
    (r"^language_model\.model\.", "model.language_model."), (r"^language_model\.lm_head\.", "lm_head."),
]


def original_to_hf(sd):
    out = {}
    for name, t in sd.items():
        if name.startswith(model.JANUS_UNUSED):
            continue
        m = re.match(r"^vision_model\.vision_tower\.blocks\.(\d+)\.attn\.qkv\.(weight|bias)$", name)
        if m:
            for part, chunk in zip("qkv", t.chunk(3)):
                out[f"model.vision_model.encoder.layers.{m[1]}.self_attn.{part}_proj.{m[2]}"] = chunk.clone()
            continue
        new = name
        for pattern, repl in FORWARD:
            new = re.sub(pattern, repl, new)
        out[new] = t[0] if name.endswith("pos_embed") else t
    return out


def test_forward_rules_reproduce_the_published_map():
    """The test's own forward rules agree with every row of spec/keys/janus_pro_1b_original_to_hf.tsv."""
    rows = [line.rstrip("\n").split("\t") for line in open(key_file("janus_pro_1b_original_to_hf.tsv"))][1:]
    expected = {hf: orig for orig, hf, transform in rows if transform != "drop"}
    shapes = key_list("janus_pro_1b_original")
    produced = original_to_hf({k: torch.empty(s, device="meta") for k, s in shapes.items()})
    assert set(produced) == set(expected)


@pytest.mark.parametrize("folder", JANUS_DIRS, ids=os.path.basename)
@torch.no_grad()
def test_hf_layout_checkpoint_gives_identical_model(folder, tmp_path):
    reference = model.Janus.from_pretrained(folder)
    shutil.copy(os.path.join(folder, "config.json"), tmp_path)
    save_file(original_to_hf(model.read_checkpoint(folder)), str(tmp_path / "model.safetensors"))
    converted = model.Janus.from_pretrained(str(tmp_path))
    ref_sd, new_sd = reference.state_dict(), converted.state_dict()
    for k, v in ref_sd.items():
        if not k.startswith(model.JANUS_UNUSED):
            assert torch.equal(v, new_sd[k]), k


def copy_fixture(folder, dst, sd=None):
    """The fixture folder without its weights (the caller writes them), optionally with a state dict as safetensors."""
    for f in glob.glob(os.path.join(folder, "*.json")):
        shutil.copy(f, dst)
    if sd is not None:
        save_file(sd, os.path.join(dst, "model.safetensors"))
    return str(dst)


@pytest.mark.parametrize("layout", ["bin", "bin_sharded", "safetensors_sharded", "bf16_without_unused"])
def test_every_file_layout_loads_the_same_tensors(layout, tmp_path):
    folder = JANUS_DIRS[0]
    sd = model.read_checkpoint(folder)
    copy_fixture(folder, tmp_path)
    if layout == "bin":
        torch.save(sd, tmp_path / "pytorch_model.bin")
    elif layout in ("bin_sharded", "safetensors_sharded"):
        ext = ".bin" if layout == "bin_sharded" else ".safetensors"
        stem = "pytorch_model" if ext == ".bin" else "model"
        names = sorted(sd)
        weight_map = {}
        for i, part in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
            shard = f"{stem}-0000{i + 1}-of-00002{ext}"
            chunk = {k: sd[k] for k in part}
            torch.save(chunk, tmp_path / shard) if ext == ".bin" else save_file(chunk, str(tmp_path / shard))
            weight_map.update({k: shard for k in part})
        json.dump({"weight_map": weight_map}, open(tmp_path / f"{stem}{ext}.index.json", "w"))
    else:  # bf16 on disk like the real checkpoints, and the 14 unused tensors left out
        sd = {k: v.to(torch.bfloat16) for k, v in sd.items() if not k.startswith(model.JANUS_UNUSED)}
        save_file(sd, str(tmp_path / "model.safetensors"))
    loaded = model.Janus.from_pretrained(str(tmp_path), dtype=torch.float32).state_dict()
    for k, v in sd.items():
        assert torch.equal(loaded[k], v.float()), k


@pytest.mark.parametrize("damage", ["remove", "rename", "reshape"])
def test_broken_checkpoint_names_the_tensor(damage, tmp_path):
    folder = JANUS_DIRS[0]
    sd = model.read_checkpoint(folder)
    victim = "language_model.model.layers.0.self_attn.q_proj.weight"
    t = sd.pop(victim)
    if damage == "rename":
        sd["language_model.model.layers.0.self_attn.q_prj.weight"] = t
    elif damage == "reshape":
        sd[victim] = t[:-1].clone()
    copy_fixture(folder, tmp_path, sd)
    with pytest.raises(model.CheckpointError) as err:
        model.Janus.from_pretrained(str(tmp_path))
    assert victim in str(err.value)
    if damage == "rename":
        assert "q_prj" in str(err.value) and "unexpected" in str(err.value)
    if damage == "reshape":
        assert "mis-shaped" in str(err.value)


def test_every_problem_is_listed_in_one_error(tmp_path):
    folder = JANUS_DIRS[0]
    sd = model.read_checkpoint(folder)
    del sd["gen_embed.weight"], sd["aligner.layers.0.bias"]
    sd["surprise.weight"] = torch.zeros(1)
    copy_fixture(folder, tmp_path, sd)
    with pytest.raises(model.CheckpointError) as err:
        model.Janus.from_pretrained(str(tmp_path))
    for name in ("gen_embed.weight", "aligner.layers.0.bias", "surprise.weight"):
        assert name in str(err.value)


def test_truncated_and_foreign_files_fail_clearly(tmp_path):
    folder = JANUS_DIRS[0]
    copy_fixture(folder, tmp_path)
    data = open(os.path.join(folder, "model.safetensors"), "rb").read()
    open(tmp_path / "model.safetensors", "wb").write(data[: len(data) // 2])
    with pytest.raises(model.CheckpointError, match="model.safetensors"):
        model.Janus.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "model.safetensors")
    open(tmp_path / "pytorch_model.bin", "wb").write(b"this is not a checkpoint")
    with pytest.raises(model.CheckpointError, match="pytorch_model.bin"):
        model.Janus.from_pretrained(str(tmp_path))
    os.remove(tmp_path / "pytorch_model.bin")
    with pytest.raises(model.CheckpointError, match="no weights"):
        model.Janus.from_pretrained(str(tmp_path))


def test_tokenizer_without_a_needed_special_token(tmp_path):
    folder = JANUS_DIRS[0]
    copy_fixture(folder, tmp_path)
    tok = json.load(open(os.path.join(folder, "tokenizer.json")))
    for entry in tok["added_tokens"]:
        if entry["content"] == "<begin_of_image>":
            entry["content"] = "<start_of_picture>"
    tok["model"]["vocab"].pop("<begin_of_image>", None)
    json.dump(tok, open(tmp_path / "tokenizer.json", "w"))
    with pytest.raises(ValueError, match="<begin_of_image>"):
        model.JanusProcessor(str(tmp_path), model.JANUS_CONFIGS["janus-pro-1b"])


def test_converter_writes_one_original_layout_safetensors(tmp_path):
    folder = JANUS_DIRS[0]
    src = tmp_path / "src"
    src.mkdir()
    copy_fixture(folder, src)
    torch.save(model.read_checkpoint(folder), src / "pytorch_model.bin")
    dst = model.convert_checkpoint(str(src), str(tmp_path / "dst"))
    # janus_roles.json: the roles the converter read (here guessed) travel with the converted folder
    assert set(os.listdir(dst)) == {"model.safetensors", model.ROLES_FILE} | {f for f in os.listdir(src)
                                                                              if f.endswith(".json")}
    a, b = load_file(os.path.join(dst, "model.safetensors")), model.read_checkpoint(folder)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# -----------------------------------------------------------------------------------------------------------
# loading refuses what would load "fine" and be silently wrong


@pytest.mark.parametrize("folder", JANUS_DIRS[:1] + fixture_dirs("showo")[:1], ids=os.path.basename)
def test_weights_with_nan_or_inf_are_refused_by_name(folder, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    sd = load_file(str(bad / "model.safetensors"))
    name = sorted(k for k, v in sd.items() if v.is_floating_point())[3]
    sd[name] = sd[name].clone()
    sd[name].view(-1)[0] = float("nan")
    save_file(sd, str(bad / "model.safetensors"))
    with pytest.raises(model.CheckpointError, match=re.escape(name)):
        model.load_model(str(bad))


def test_a_boolean_vq_field_given_as_a_string_is_refused(tmp_path):
    cfg = json.load(open(os.path.join(JANUS_DIRS[0], "config.json")))
    cfg["gen_vision_config"].setdefault("params", {})["codebook_l2_norm"] = "false"
    with pytest.raises(ValueError, match="codebook_l2_norm must be true or false"):
        model.JanusConfig.from_json(cfg)


def test_a_showo_tokenizer_holding_some_of_the_added_tokens_is_refused(tmp_path):
    """All ten of Show-o's additions or none (then they are appended in the official order); a file holding nine
    would have the tenth appended at a shifted id, and every image id after it."""
    from tokenizers import Tokenizer, models
    words = {"<|endoftext|>": 0, "a": 1, "cat": 2}
    for held in (0, 9, 10):
        tok = Tokenizer(models.WordLevel(dict(words), unk_token="<|endoftext|>"))
        tok.add_special_tokens(["[PAD]", *model.SHOWO_SPECIALS][:held])
        path = tmp_path / f"tokenizer_{held}.json"
        tok.save(str(path))
        if held == 9:
            with pytest.raises(ValueError, match=r"holds 9 of Show-o's 10 added tokens; missing \['<\|lvg\|>'\]"):
                model.ShowOTokenizer(str(path))
        else:
            t = model.ShowOTokenizer(str(path))
            assert t.pad_id == 3 and t.special_ids["<|soi|>"] == 4 and t.image_offset == 13
