"""
LoRA in plain PyTorch: a frozen linear layer plus a trainable low-rank update (Hu et al. 2021),

    y = x W^T + b + (alpha / r) (x A^T) B^T,     A [r, in] Kaiming-uniform, B [out, r] = 0 at the start,

so training starts at the base model exactly, and with the adapters switched off (adapters_off) the same weights
are the base model again: GRPO's reference policy with no second copy. Only A and B train (in fp32, whatever the
base's dtype), so there is no fp32 master copy or Adam state for the base weights.

Adapters are saved in PEFT's layout - adapter_model.safetensors with keys base_model.model.<module>.lora_A.weight
/ lora_B.weight, and adapter_config.json (peft_type LORA, r, lora_alpha, target_modules as a regex over module
names) - so that a PEFT user can load them onto the official model, whose module names are ours.

    python lora.py merge BASE ADAPTER OUT      # BASE + adapter -> one plain checkpoint folder (load_model reads it)
"""
import contextlib
import json
import math
import os
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

ADAPTER_WEIGHTS, ADAPTER_CONFIG = "adapter_model.safetensors", "adapter_config.json"
# every linear layer of a transformer block: Janus' LLaMA (attention and MLP) and Show-o's Phi
BLOCK_LINEARS = r"(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj|dense|fc1|fc2)"


class LoRALinear(nn.Module):
    """Replaces an nn.Linear, keeping its parameters under their names (weight, bias), plus lora_A and lora_B."""

    def __init__(self, base, rank, alpha):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.weight.requires_grad_(False)
        if self.bias is not None:
            self.bias.requires_grad_(False)
        device = base.weight.device if base.weight.device.type != "meta" else None
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=device, dtype=torch.float32)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=device, dtype=torch.float32)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # PEFT's initialisation
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha, self.scaling, self.enabled = rank, alpha, alpha / rank, True

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if not self.enabled:
            return y
        return y + (self.lora_B(self.lora_A(x.to(self.lora_A.weight.dtype))) * self.scaling).to(y.dtype)


def lora_layers(model):
    """{module name: LoRALinear} of a model."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def target_regex(model, pattern=BLOCK_LINEARS):
    """The full-name regex (PEFT's target_modules as a string) of the linear layers inside the model's transformer
    blocks whose name within the block matches `pattern` at its end."""
    names = {id(m): n for n, m in model.named_modules()}
    prefix = names[id(model.blocks)]  # e.g. language_model.model.layers
    inner = sorted({n for n, m in model.blocks[0].named_modules()
                    if isinstance(m, nn.Linear) and re.search(f"(^|\\.){pattern}$", n)})
    if not inner:
        raise ValueError(f"--lora-targets {pattern!r} matches no linear layer of a transformer block; the block has "
                         f"{sorted(n for n, m in model.blocks[0].named_modules() if isinstance(m, nn.Linear))}")
    return re.escape(prefix) + r"\.\d+\.(" + "|".join(re.escape(n) for n in inner) + ")"


def apply_lora(model, rank, alpha, targets):
    """Wrap every nn.Linear whose full name fully matches the regex `targets` (see target_regex) in a LoRALinear.
    Returns the wrapped names. Every other parameter is frozen."""
    model.requires_grad_(False)
    wrapped = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            if isinstance(child, nn.Linear) and re.fullmatch(targets, full):
                setattr(module, child_name, LoRALinear(child, rank, alpha))
                wrapped.append(full)
    if not wrapped:
        raise ValueError(f"LoRA targets {targets!r} match no linear layer")
    return wrapped


@contextlib.contextmanager
def adapters_off(model):
    """The base model, from the same weights: every LoRALinear computes x W^T + b alone inside this block."""
    layers = lora_layers(model).values()
    before = [m.enabled for m in layers]
    for m in layers:
        m.enabled = False
    try:
        yield model
    finally:
        for m, on in zip(layers, before):
            m.enabled = on


def adapter_state_dict(model):
    """The adapters in PEFT's key names (fp32, on the CPU)."""
    out = {}
    for name, m in lora_layers(model).items():
        for part in ("lora_A", "lora_B"):
            w = getattr(m, part).weight
            w = w.full_tensor() if hasattr(w, "full_tensor") else w  # an FSDP2 shard: gathered
            out[f"base_model.model.{name}.{part}.weight"] = w.detach().float().cpu().contiguous()
    return out


def save_adapter(model, out, targets, base_model=None, state=None):
    """OUT/adapter_model.safetensors + OUT/adapter_config.json (PEFT's format). state: adapter_state_dict(model),
    if already gathered (under FSDP2 every rank gathers, one writes)."""
    from safetensors.torch import save_file
    layer = next(iter(lora_layers(model).values()))
    os.makedirs(out, exist_ok=True)
    save_file(state or adapter_state_dict(model), os.path.join(out, ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = dict(peft_type="LORA", r=layer.rank, lora_alpha=layer.alpha, target_modules=targets, lora_dropout=0.0,
                  bias="none", fan_in_fan_out=False, init_lora_weights=True, task_type=None,
                  base_model_name_or_path=base_model)
    with open(os.path.join(out, ADAPTER_CONFIG), "w") as f:
        json.dump(config, f, indent=1)


def load_adapter(model, folder, merge=False):
    """Read an adapter folder onto a model: wrap its target layers (if not wrapped yet) and load A and B strictly
    (a missing, extra or mis-shaped tensor is an error naming it). merge: fold them into the base weights."""
    from safetensors.torch import load_file
    path = os.path.join(folder, ADAPTER_CONFIG)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no {ADAPTER_CONFIG} in {folder}: not a LoRA adapter folder")
    config = json.load(open(path))
    if config.get("peft_type") != "LORA" or not isinstance(config.get("target_modules"), str):
        raise ValueError(f"{path}: expected a LoRA config whose target_modules is a regex string")
    if not lora_layers(model):
        apply_lora(model, int(config["r"]), float(config["lora_alpha"]), config["target_modules"])
    sd = load_file(os.path.join(folder, ADAPTER_WEIGHTS))
    want = {k: v.shape for k, v in adapter_state_dict(model).items()}
    problems = sorted(set(want) ^ set(sd)) + [k for k in set(want) & set(sd) if sd[k].shape != want[k]]
    if problems:
        raise ValueError(f"{folder}: adapter tensors do not fit the model: {problems[:8]}")
    with torch.no_grad():
        for name, m in lora_layers(model).items():
            for part in ("lora_A", "lora_B"):
                getattr(m, part).weight.copy_(sd[f"base_model.model.{name}.{part}.weight"])
    if merge:
        merge_adapters(model)
    return model


@torch.no_grad()
def merge_adapters(model):
    """W <- W + (alpha / r) B A in every LoRALinear, which becomes a plain nn.Linear again (same names)."""
    for name, m in lora_layers(model).items():
        parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
        linear = nn.Linear(m.weight.shape[1], m.weight.shape[0], bias=m.bias is not None, device="meta")
        delta = m.scaling * (m.lora_B.weight @ m.lora_A.weight)
        linear.weight = nn.Parameter((m.weight.float() + delta).to(m.weight.dtype), requires_grad=False)
        if m.bias is not None:
            linear.bias = m.bias
        setattr(parent, name.rpartition(".")[2], linear)
    return model


def main():
    import argparse
    from model import load_model, write_model_folder
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("merge", help="fold an adapter into its base: one plain checkpoint folder")
    p.add_argument("base")
    p.add_argument("adapter")
    p.add_argument("out")
    p.add_argument("--vq", help="Show-o only: the MAGVIT-v2 folder, if not inside base")
    args = ap.parse_args()
    model, processor = load_model(args.base, vq_dir=args.vq)
    load_adapter(model, args.adapter, merge=True)
    write_model_folder(args.out, model.state_dict(), args.base, processor)
    print(f"wrote {args.out}: {args.base} with {args.adapter} merged in")


if __name__ == "__main__":
    main()
