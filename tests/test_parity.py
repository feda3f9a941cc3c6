"""Parity against the golden fixtures: tiny random-weight models in the ORIGINAL checkpoint layout, run through the
official implementations. Every fixture folder under $UNIRL_FIXTURES (default ../shared/fixtures) whose name
starts with `janus` is checked case by case at the tolerances its README states."""
import glob
import json
import os

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import generate
import model
import understand

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES = os.environ.get("UNIRL_FIXTURES", os.path.join(ROOT, "..", "shared", "fixtures"))
JANUS_DIRS = sorted(d for d in glob.glob(os.path.join(FIXTURES, "janus*")) if os.path.isdir(d))

FLOAT_TOL = 1e-5  # logits, hidden states, features, embeddings, cfg logits, VQ pixels and latents
PIXEL_TOL = 1e-6  # image-processor outputs


def close(name, got, want, tol=FLOAT_TOL):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got.double() - want.double()).abs().max().item()
    assert diff <= tol, f"{name}: max abs diff {diff:.3g} > {tol}"


def same(name, got, want):
    assert got.shape == want.shape and torch.equal(got.cpu(), want.cpu()), f"{name}: not equal\n{got}\n{want}"


def uint8_close(name, got, want):
    assert got.shape == want.shape, f"{name}: shape {tuple(got.shape)} vs {tuple(want.shape)}"
    diff = (got.int() - want.int()).abs().max().item()
    assert diff <= 1, f"{name}: {diff} LSB apart"


_loaded = {}


def janus(folder):
    """(model, processor, cases, meta) loaded once per fixture folder."""
    if folder not in _loaded:
        m, p = model.load_janus(folder, dtype=torch.float32)
        _loaded[folder] = (m, p, load_file(os.path.join(folder, "cases.safetensors")),
                           json.load(open(os.path.join(folder, "meta.json"))))
    return _loaded[folder]


def conversation_text(processor, conversation, system):
    return processor.chat([(m["role"], m["content"]) for m in conversation], system)


janus_dirs = pytest.mark.parametrize("folder", JANUS_DIRS or [pytest.param(None, marks=pytest.mark.skip(
    reason=f"no janus* fixture folder under {os.path.abspath(FIXTURES)} (set UNIRL_FIXTURES)"))],
    ids=os.path.basename)


@janus_dirs
@torch.no_grad()
def test_janus_language_model(folder):
    m, p, c, meta = janus(folder)
    hidden = m(m.embed_tokens(c["lm.input_ids"]))
    close("lm.last_hidden_state", hidden, c["lm.last_hidden_state"])
    close("lm.logits", m.text_logits(hidden), c["lm.logits"])


@janus_dirs
@torch.no_grad()
def test_janus_vision_and_aligner(folder):
    m, p, c, meta = janus(folder)
    close("vision.features", m.vision_model.vision_tower(c["vision.pixel_values"]), c["vision.features"])
    close("vision.aligned", m.image_features(c["vision.pixel_values"]), c["vision.aligned"])


@janus_dirs
@torch.no_grad()
def test_janus_generation_heads(folder):
    m, p, c, meta = janus(folder)
    close("gen_embed.embeds", m.gen_embeds(c["gen_embed.ids"]), c["gen_embed.embeds"])
    close("gen_head.logits", m.image_logits(c["gen_head.hidden"]), c["gen_head.logits"])


@janus_dirs
@torch.no_grad()
def test_janus_vq_decode_and_encode(folder):
    m, p, c, meta = janus(folder)
    pixels = m.decode_codes(c["vq_decode.codes"])
    close("vq_decode.pixels", pixels, c["vq_decode.pixels"])
    uint8_close("vq_decode.image_uint8", model.to_uint8(pixels), c["vq_decode.image_uint8"])
    vq = m.gen_vision_model
    close("vq_encode.latent", vq.quant_conv(vq.encoder(c["vq_encode.pixels"])), c["vq_encode.latent"])
    codes, quant = vq.encode(c["vq_encode.pixels"])
    same("vq_encode.codes", codes, c["vq_encode.codes"])
    close("vq_encode.quant", quant, c["vq_encode.quant"])


@janus_dirs
def test_janus_image_processor(folder):
    m, p, c, meta = janus(folder)
    names = sorted({k.split(".")[1] for k in c if k.startswith("imgproc.")})
    assert names, "fixture has no imgproc cases"
    for i in names:
        image = Image.fromarray(c[f"imgproc.{i}.image_uint8"].numpy())
        close(f"imgproc.{i}.pixel_values", p.preprocess(image)[None], c[f"imgproc.{i}.pixel_values"], PIXEL_TOL)


@janus_dirs
@torch.no_grad()
def test_janus_understanding_single(folder):
    m, p, c, meta = janus(folder)
    conv = meta["und"]["conversation"]
    text = conversation_text(p, conv, meta["system_prompt"])
    assert text == meta["und"]["sft_format"]
    images = [Image.open(os.path.join(folder, f)) for f in conv[0]["images"]]
    batch = p.understanding_batch([text], [images])
    for k in ("input_ids", "attention_mask", "images_seq_mask", "images_emb_mask"):
        same(f"und.{k}", batch[k], c[f"und.{k}"])
    close("und.pixel_values", batch["pixel_values"], c["und.pixel_values"], PIXEL_TOL)
    close("und.image_embeds", m.image_features(batch["pixel_values"][:, 0]), c["und.image_embeds"])
    embeds = model.janus_inputs_embeds(m, batch["input_ids"], batch["images_seq_mask"], batch["pixel_values"],
                                       batch["images_emb_mask"])
    close("und.inputs_embeds", embeds, c["und.inputs_embeds"])
    close("und.logits", m.text_logits(m(embeds)), c["und.logits"])
    ids, _ = understand.janus_generate_text(m, batch, p.ids["eos"], c["und.generated_ids"].shape[1])
    same("und.generated_ids", ids, c["und.generated_ids"])


@janus_dirs
@torch.no_grad()
def test_janus_understanding_left_padded_batch(folder):
    m, p, c, meta = janus(folder)
    convs = meta["und_batch"]["conversations"]
    texts = [conversation_text(p, conv, meta["system_prompt"]) for conv in convs]
    assert texts == meta["und_batch"]["sft_format"]
    images = [[Image.open(os.path.join(folder, f)) for msg in conv for f in msg.get("images", [])] for conv in convs]
    batch = p.understanding_batch(texts, images)
    for k in ("input_ids", "attention_mask", "images_seq_mask", "images_emb_mask"):
        same(f"und_batch.{k}", batch[k], c[f"und_batch.{k}"])
    close("und_batch.pixel_values", batch["pixel_values"], c["und_batch.pixel_values"], PIXEL_TOL)
    embeds = model.janus_inputs_embeds(m, batch["input_ids"], batch["images_seq_mask"], batch["pixel_values"],
                                       batch["images_emb_mask"])
    close("und_batch.inputs_embeds", embeds, c["und_batch.inputs_embeds"])
    valid = batch["attention_mask"].bool()
    positions = (valid.long().cumsum(1) - 1).clamp(min=0)
    bias = model.attention_bias(valid, torch.arange(valid.shape[1]), embeds.dtype)
    logits = m.text_logits(m(embeds, positions, bias))
    close("und_batch.logits (real tokens)", logits[valid], c["und_batch.logits"][valid])
    ids, _ = understand.janus_generate_text(m, batch, p.ids["eos"], c["und_batch.generated_ids"].shape[1])
    same("und_batch.generated_ids", ids, c["und_batch.generated_ids"])


@janus_dirs
@torch.no_grad()
def test_janus_cfg_generation(folder):
    m, p, c, meta = janus(folder)
    t2i = meta["t2i"]
    prompt = t2i["conversation"][0]["content"]
    prompt_ids = p.t2i_prompt_ids(prompt)
    same("t2i.prompt_ids", torch.tensor(prompt_ids), c["t2i.prompt_ids"])
    assert p.ids["pad"] == int(c["t2i.pad_id"])
    same("t2i.cfg_input_ids uncond rows", torch.tensor(generate.unconditional_ids(prompt_ids, p.ids["pad"])),
         c["t2i.cfg_input_ids"][1::2][0])
    P, T = t2i["parallel_size"], t2i["image_token_num_per_image"]
    assert m.cfg.gen_grid ** 2 == T
    for mode in ("greedy", "sample"):
        generator = torch.Generator().manual_seed(int(c["t2i.sample.seed"])) if mode == "sample" else None
        out = generate.janus_generate(m, p, [prompt], P, t2i["cfg_weight"], t2i["temperature"], greedy=mode == "greedy",
                                      generator=generator, return_logits=True, return_logprobs=True)
        same(f"t2i.{mode}.tokens", out["tokens"], c[f"t2i.{mode}.tokens"])
        close(f"t2i.{mode}.cfg_logits", out["logits"], c[f"t2i.{mode}.cfg_logits"])
        close(f"t2i.{mode}.pixels", m.decode_codes(out["tokens"]), c[f"t2i.{mode}.pixels"])
        uint8_close(f"t2i.{mode}.image_uint8", out["images"], c[f"t2i.{mode}.image_uint8"])
        # the returned log-probs are those of the sampled codes under softmax(guided / temperature)
        want = torch.log_softmax(c[f"t2i.{mode}.cfg_logits"] / t2i["temperature"], -1)
        close(f"t2i.{mode}.logprobs", out["logprobs"], want.gather(2, out["tokens"][..., None])[..., 0], 1e-4)
