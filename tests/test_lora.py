"""LoRA: starts at the base model exactly, the adapters off are the base, only adapters train, the PEFT-format
adapter round-trips (loaded or merged), and train.py's LoRA-GRPO runs on both families."""
import glob
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import lora
import model
import rollout
import train
from data_paths import ROOT, fixture_dirs

MODELS = fixture_dirs("janus")[:1] + fixture_dirs("showo")[:1]
CAT = dict(prompt="a photo of a cat", question="What is the main item in this image?", answer="cat",
           tag="single_object", include=[{"class": "cat", "count": 1}])


def logits(m, seed=0):
    """Logits of one deterministic input through the transformer blocks (either family)."""
    g = torch.Generator().manual_seed(seed)
    if hasattr(m, "showo"):
        ids = torch.randint(0, m.config.vocab_size, (2, 12), generator=g)
        return m(ids)
    x = torch.randn(2, 12, m.cfg.hidden_size, generator=g)
    return m.text_logits(m(x))


@pytest.mark.parametrize("folder", MODELS, ids=os.path.basename)
def test_lora_starts_at_the_base_and_off_is_the_base(folder):
    m, _ = model.load_model(folder)
    base = logits(m)
    targets = lora.target_regex(m)
    wrapped = lora.apply_lora(m, 4, 8.0, targets)
    assert len(wrapped) == len(m.blocks) * (7 if "janus" in folder else 6)
    assert torch.equal(logits(m), base)  # B = 0
    with torch.no_grad():
        for layer in lora.lora_layers(m).values():
            layer.lora_B.weight.normal_()
    assert not torch.allclose(logits(m), base)
    with lora.adapters_off(m):
        assert torch.equal(logits(m), base)
    assert {n for n, p in m.named_parameters() if p.requires_grad} == {
        f"{n}.{part}.weight" for n in wrapped for part in ("lora_A", "lora_B")}
    with pytest.raises(ValueError, match="matches no linear layer"):
        lora.target_regex(m, "no_such_proj")


def saved_adapter(folder, out, pattern, alpha):
    """A rank-2 adapter with non-zero B on the fixture model, saved to `out`; -> the logits it gives."""
    m, _ = model.load_model(folder)
    targets = lora.target_regex(m, pattern)
    lora.apply_lora(m, 2, alpha, targets)
    with torch.no_grad():
        for layer in lora.lora_layers(m).values():
            layer.lora_B.weight.normal_(std=0.1)
    lora.save_adapter(m, str(out), targets, folder)
    return logits(m)


@pytest.mark.parametrize("folder", MODELS, ids=os.path.basename)
def test_adapter_round_trips_loaded_and_merged(folder, tmp_path):
    want = saved_adapter(folder, tmp_path / "adapter", "q_proj|v_proj", 16.0)
    config = json.load(open(tmp_path / "adapter" / "adapter_config.json"))
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 16.0
    keys = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert all(k.startswith("base_model.model.") and k.endswith(("lora_A.weight", "lora_B.weight")) for k in keys)
    loaded = lora.load_adapter(model.load_model(folder)[0], str(tmp_path / "adapter"))
    torch.testing.assert_close(logits(loaded), want, atol=1e-5, rtol=0)
    merged = lora.load_adapter(model.load_model(folder)[0], str(tmp_path / "adapter"), merge=True)
    assert not lora.lora_layers(merged)
    torch.testing.assert_close(logits(merged), want, atol=1e-5, rtol=0)
    assert set(merged.state_dict()) == set(model.load_model(folder)[0].state_dict())  # a plain checkpoint again


def test_merge_cli_writes_a_folder_that_load_model_reads(tmp_path):
    folder = MODELS[0]
    want = saved_adapter(folder, tmp_path / "adapter", lora.BLOCK_LINEARS, 4.0)
    subprocess.run([sys.executable, os.path.join(ROOT, "lora.py"), "merge", folder, str(tmp_path / "adapter"),
                    str(tmp_path / "merged")], check=True, capture_output=True, cwd=ROOT)
    torch.testing.assert_close(logits(model.load_model(str(tmp_path / "merged"))[0]), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("folder", MODELS, ids=os.path.basename)
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_lora_grpo_trains_only_adapters_and_its_reference_is_the_base(folder, dtype, tmp_path):
    out = tmp_path / "run"
    argv = lambda out: ["--model", folder, "--algo", "grpo", "--out", str(out), "--steps", "2", "--tasks", "8",
                        "--group-size", "2", "--max-answer-tokens", "3", "--showo-steps", "3", "--lr", "1e-2",
                        "--warmup", "1", "--cfg", "2", "--beta", "0.1", "--lora-rank", "4", "--dtype", dtype,
                        "--sample-every", "0", "--save-every", "1", "--reward", "plugins:first_image_wins"]
    train.main(argv(out))
    lines = [json.loads(x) for x in open(out / "log.jsonl")]
    assert all(torch.isfinite(torch.tensor(x["loss_img"])) for x in lines) and "img_kl" in lines[0]
    ckpt = sorted(glob.glob(str(out / "step_*[0-9]")))[-1]
    assert sorted(os.listdir(ckpt)) == ["adapter_config.json", "adapter_model.safetensors", "train_state", "train_state.json"]
    trained = lora.load_adapter(model.load_model(folder)[0], ckpt)
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora.lora_layers(trained).values())
    # the reference log-probs (adapters off) equal the untouched base model's, exactly
    base, p = model.load_model(folder)
    ro = rollout.rollout(base, p, [CAT], 2, 2.0, generator=torch.Generator().manual_seed(0), max_answer_tokens=3,
                         steps=3)
    with torch.no_grad(), lora.adapters_off(trained):
        off = rollout.sequence_logprobs(trained, p, ro, cfg_weight=2.0)
        want = rollout.sequence_logprobs(base, p, ro, cfg_weight=2.0)
    for part in ("img", "ans"):
        assert torch.equal(off[part][0], want[part][0])
    # an interrupted and resumed LoRA run ends with the same adapters
    resumed = tmp_path / "resumed"
    train.main(argv(resumed) + ["--stop-after", "1"])
    train.main(argv(resumed) + ["--resume"])
    a = load_file(os.path.join(ckpt, "adapter_model.safetensors"))
    b = load_file(os.path.join(sorted(glob.glob(str(resumed / "step_*[0-9]")))[-1], "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # resume is exact


@pytest.mark.slow
@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
@pytest.mark.parametrize("folder", MODELS, ids=os.path.basename)
def test_torchrun_lora_two_ranks_equal_one_process(folder, sharding, tmp_path):
    """LoRA-GRPO on 2 ranks (DDP, FSDP2) ends with the adapters of one process on the same global batch (fp32)."""
    common = lambda out, per_rank: ["--model", folder, "--algo", "grpo", "--out", str(out), "--steps", "2",
                                    "--tasks", "8", "--group-size", "2", "--max-answer-tokens", "3", "--showo-steps",
                                    "3", "--optimizer", "sgd", "--lr", "0.5", "--warmup", "1", "--cfg", "2",
                                    "--beta", "0.1", "--lora-rank", "4", "--sample-every", "0",
                                    "--reward", "plugins:first_image_wins",
                                    "--prompts-per-rank", str(per_rank), "--device", "cpu"]
    train.main(common(tmp_path / "one", 2))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           os.path.join(ROOT, "train.py")] + common(tmp_path / "two", 1) + (["--fsdp"] if sharding == "fsdp" else [])
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env=dict(os.environ, OMP_NUM_THREADS="1",
                                                                         PYTHONPATH=os.path.join(ROOT, "tests")),
                         timeout=900)
    assert run.returncode == 0, run.stderr[-4000:]
    a, b = (load_file(os.path.join(sorted(glob.glob(str(tmp_path / d / "step_*[0-9]")))[-1],
                                   "adapter_model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-5
    assert max(a[k].abs().max().item() for k in a if "lora_B" in k) > 0  # the adapters trained
