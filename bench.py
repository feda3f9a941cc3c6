"""
Sampling speed: the official-style Janus loop against ours, and both against the memory roofline. And memory: the
peak per GPU of one real training step at full size, simulated on fake tensors (--memory).

    plain  = the official generation_inference.py structure: interleaved cond/uncond rows, a KV cache grown by
             concatenation every step, no compile, torch.multinomial
    ours   = generate.janus_generate: static KV cache, [cond; uncond] halves, exponential race, and on CUDA the
             decode step compiled with CUDA graphs
    roofline per step = (weight bytes + KV bytes) / measured copy bandwidth   (spec/performance.md section 3)

Usage:
    python bench.py --cpu        # tiny random models, eager, < 2 minutes on 2 cores
    python bench.py              # GPU: Janus-Pro-1B/-7B (16 images x 576 tokens) and Show-o-512 (16 images x 16
                                 # steps) shapes, random bf16 weights
    python bench.py --memory     # any machine: peak GPU memory of one training step at full size (fake tensors)

Show-o: plain = Showo.t2i_generate's structure (a full forward and full-vocabulary logits at every position, every
step); ours = generate.showo_maskgit (logits at image positions over codebook columns, text-block keys cached).
"""
import argparse
import contextlib
import gc
import importlib
import os
import tempfile
import time
import warnings
import weakref
from dataclasses import replace
from unittest import mock

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch.distributed.tensor import DTensor
from torch.utils._python_dispatch import TorchDispatchMode

import generate
import model as model_py
import reward
from model import JANUS_CONFIGS, JANUS_SYSTEM_PROMPT, Janus, ShowO, ShowOConfig, apply_rope, omni_attention_mask, \
    rope_cos_sin


class FixedPrompt:
    """Stands in for the processor: every prompt is the same P random text ids (speed does not read them)."""

    def __init__(self, vocab, length, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.prompt = torch.randint(10, vocab, (length,), generator=g).tolist()
        self.ids = dict(pad=0)

    def t2i_prompt_ids(self, _):
        return self.prompt


def random_model(cls, cfg, device, dtype):
    """A model of this shape with random weights, without ever materialising them on the CPU."""
    with torch.device("meta"):
        m = cls(cfg)
    m = m.to_empty(device=device)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.dim() == 1:
                p.fill_(1.0 if "norm" in name else 0.0)
            else:
                p.normal_(0, 0.02)
        for b in m.buffers():
            b.zero_()
    return m.to(dtype).eval()


def layer_forward_growing_cache(layer, h, past, position0, theta):
    """One LLaMA block with a transformers-style dynamic cache: K/V concatenated every step."""
    attn = layer.self_attn
    B, L, _ = h.shape
    x = layer.input_layernorm(h)
    q = attn.q_proj(x).view(B, L, attn.n_heads, attn.head_dim).transpose(1, 2)
    k = attn.k_proj(x).view(B, L, attn.n_kv, attn.head_dim).transpose(1, 2)
    v = attn.v_proj(x).view(B, L, attn.n_kv, attn.head_dim).transpose(1, 2)
    positions = torch.arange(position0, position0 + L, device=h.device).expand(B, L)
    cos, sin = rope_cos_sin(positions, attn.head_dim, theta, h.dtype)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if past is not None:
        k, v = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
    y = F.scaled_dot_product_attention(q, k, v, is_causal=L > 1)
    h = h + attn.o_proj(y.transpose(1, 2).reshape(B, L, -1))
    return h + layer.mlp(layer.post_attention_layernorm(h)), (k, v)


@torch.no_grad()
def plain_generate(model, prompt, n_images, cfg_weight=5.0, temperature=1.0):
    """The official loop structure (generation_inference.py), kept deliberately plain."""
    T = model.cfg.gen_grid ** 2
    rows = torch.tensor(prompt, device=model.gen_embed.weight.device).repeat(2 * n_images, 1)
    rows[1::2, 1:-1] = 0  # interleaved unconditional rows: pad between BOS and <begin_of_image>
    h, past, position = model.embed_tokens(rows), [None] * len(model.language_model.model.layers), 0
    tokens = torch.zeros(n_images, T, dtype=torch.long, device=rows.device)
    for t in range(T):
        for i, layer in enumerate(model.language_model.model.layers):
            h, past[i] = layer_forward_growing_cache(layer, h, past[i], position, model.cfg.rope_theta)
        position += h.shape[1]
        logits = model.image_logits(model.language_model.model.norm(h[:, -1]))
        guided = logits[1::2] + cfg_weight * (logits[0::2] - logits[1::2])
        code = torch.multinomial(torch.softmax(guided / temperature, dim=-1), 1)[:, 0]
        tokens[:, t] = code
        h = model.gen_embeds(code.repeat_interleave(2))[:, None]
    return tokens


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device, repeats):
    fn()  # warm-up: compile, allocator, CUDA-graph capture
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return best


def copy_bandwidth(device):
    """Measured device copy bandwidth in bytes/s (read + write), the practical ceiling for decode."""
    n = 256 << 20  # far beyond any cache
    a, b = torch.empty(n, dtype=torch.uint8, device=device), torch.empty(n, dtype=torch.uint8, device=device)
    seconds = timed(lambda: b.copy_(a), device, 5)
    return 2 * n / seconds


def bytes_per_step(model, rows, prompt_len):
    """Weights read each decode step (LLM blocks + final norm + gen_head) and the static KV cache read."""
    cfg = model.cfg
    elem = model.gen_embed.weight.element_size()
    weights = sum(p.numel() for p in model.language_model.model.layers.parameters())
    weights += sum(p.numel() for p in model.gen_head.parameters()) + cfg.hidden_size
    kv = 2 * cfg.num_hidden_layers * rows * (prompt_len + cfg.gen_grid ** 2) * cfg.n_kv_heads * cfg.head_dim
    return weights * elem, kv * elem


def bench(name, cfg, device, dtype, n_images, prompt_len, repeats):
    model = random_model(Janus, cfg, device, dtype)
    proc = FixedPrompt(cfg.vocab_size, prompt_len)
    T = cfg.gen_grid ** 2
    plain = timed(lambda: plain_generate(model, proc.prompt, n_images), device, repeats)
    ours = timed(lambda: generate.janus_generate(model, proc, ["x"], n_images, decode=False), device, repeats)
    w, kv = bytes_per_step(model, 2 * n_images, prompt_len)
    roof = T * (w + kv) / BANDWIDTH
    print(f"{name:>14} | {n_images} images x {T} tokens | plain {plain:8.3f} s | ours {ours:8.3f} s | "
          f"speed-up {plain / ours:5.2f}x | roofline {roof:7.3f} s (ours at {roof / ours:4.0%}) | "
          f"{(w + kv) / 1e9:.2f} GB/step")
    del model
    return plain, ours, roof


# -----------------------------------------------------------------------------------------------------------
# Show-o: the official t2i_generate structure (full forward and full-vocabulary logits every step) against ours


def showo_rows(cfg, n_images, text_len, device):
    """[cond; uncond] t2i rows with arbitrary text ids: [PAD..][t2i][bos] text [eos][soi] mask x N [eoi]."""
    pad = cfg.llm_vocab_size  # [PAD] then <|soi|> <|eoi|> ... follow the text vocabulary
    soi, eoi, t2i = pad + 1, pad + 2, pad + 5
    g = torch.Generator().manual_seed(0)
    text = torch.randint(10, cfg.llm_vocab_size, (n_images, text_len - 4), generator=g)
    head = torch.tensor([[pad, t2i, 0]]).expand(n_images, -1)
    cond = torch.cat([head, text, torch.full((n_images, 1), 0)], 1)
    uncond = torch.cat([torch.full((n_images, text_len - 3), pad), torch.tensor([[t2i, 0, 0]]).expand(n_images, -1)], 1)
    image = torch.cat([torch.full((n_images, 1), soi), torch.full((n_images, cfg.num_vq_tokens), cfg.mask_token_id),
                       torch.full((n_images, 1), eoi)], 1)
    ids, uncond = torch.cat([cond, image], 1).to(device), torch.cat([uncond, image], 1).to(device)
    return ids, uncond, omni_attention_mask(torch.cat([ids, uncond]), pad, soi, eoi, rm_pad_in_image=True)


@torch.no_grad()
def plain_showo(model, ids, uncond, mask, steps, guidance=5.0):
    """Showo.t2i_generate's structure: every step a full forward with full-vocabulary logits at every position."""
    cfg = model.config
    N, M, V0 = cfg.num_vq_tokens, cfg.mask_token_id, cfg.image_offset
    P = ids.shape[1] - N - 2
    ids = ids.clone()
    for step in range(steps):
        logits = model(torch.cat([ids, torch.cat([uncond[:, :P], ids[:, P:]], 1)]), attention_mask=mask)
        cond, unc = logits.chunk(2)
        probs = ((1 + guidance) * cond - guidance * unc)[:, P + 1:P + 1 + N, V0:M].softmax(-1)
        sampled = torch.multinomial(probs.flatten(0, 1), 1).view(probs.shape[:-1])
        unknown = ids[:, P + 1:P + 1 + N] == M
        _, _, raw = generate.schedule_step(step, steps, N)
        conf = torch.where(unknown, probs.gather(-1, sampled[..., None])[..., 0], torch.finfo(probs.dtype).max)
        mask_len = torch.clamp(torch.min(unknown.sum(-1, keepdim=True) - 1, raw.to(ids.device)), min=1)
        remask = generate.mask_by_random_topk(mask_len, conf, 1.0 - (step + 1) / steps)
        ids[:, P + 1:P + 1 + N] = torch.where(remask, M, sampled + V0)
    return ids


def bench_showo(name, cfg, device, dtype, n_images, text_len, steps, repeats):
    model = random_model(ShowO, cfg, device, dtype)
    ids, uncond, mask = showo_rows(cfg, n_images, text_len, device)
    plain = timed(lambda: plain_showo(model, ids, uncond, mask, steps), device, repeats)
    ours = timed(lambda: generate.showo_maskgit(model, ids.clone(), uncond, mask, 5.0, 1.0, steps), device, repeats)
    L, N, B = ids.shape[1], cfg.num_vq_tokens, 2 * n_images
    flops = steps * (2 * sum(p.numel() for p in model.showo.model.layers.parameters()) * B * L
                     + 4 * cfg.num_hidden_layers * B * L * L * cfg.hidden_size)
    print(f"{name:>14} | {n_images} images x {steps} steps, {N} tokens | plain {plain:8.3f} s | ours {ours:8.3f} s | "
          f"speed-up {plain / ours:5.2f}x | {flops / ours / 1e12:.1f} TFLOP/s achieved by ours")
    del model
    return plain, ours


# -----------------------------------------------------------------------------------------------------------
# Memory: one real training step (rollout + loss + backward + AdamW step) at full size on fake tensors.
# FakeTensorMode gives every tensor its shape, dtype and device without storage; PeakMemory records every storage's
# life and the peak by category, on one rank of a fake process group of W ranks (FSDP2). Nothing is computed, so
# the few host reads of device values get stand-ins (HostValues): "not all finished" keeps every answer running to
# its budget, the worst case; image bytes read as zeros.

MEMORY_RUNS = {  # name: (family, train.py flags, ranks). The paper's recipe: group sizes 8 Janus, 3 Show-o; 576 /
    # 1024 image tokens with their CFG rows; answers run to the 100-token budget; beta 0.2 (a reference); bf16.
    "janus-pro-1b, DDP x 8, group 8": ("janus-pro-1b", [], 8),
    "janus-pro-1b, DDP x 8, group 8, AC": ("janus-pro-1b", ["--activation-checkpointing"], 8),
    "janus-pro-7b, FSDP2 x 8, group 8, AC": ("janus-pro-7b", ["--fsdp", "--activation-checkpointing"], 8),
    "janus-pro-7b, LoRA r64, 1 GPU, group 8, AC": ("janus-pro-7b", ["--lora-rank", "64", "--lora-alpha", "128",
                                                                    "--activation-checkpointing"], 1),
    "show-o-512, DDP x 8, group 3": ("show-o-512", [], 8),
}


class HostValues(TorchDispatchMode):
    """Answers what a fake tensor cannot: reads of device values (item, tolist, bool) get False for a bool - in
    this code 'has every answer ended?' and 'is any prompt padded?' - and 1 for a number (Adam's step count, and
    ids and rewards that steer nothing the memory depends on); and a boolean mask selects every element (its one
    use on this path marks the image slots of the understanding prompts, which are all filled)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is torch.ops.aten._local_scalar_dense.default:
            return False if args[0].dtype == torch.bool else 1
        if func is torch.ops.aten.nonzero.default:
            return every_index(args[0])
        if func is torch.ops.aten.index.Tensor and any(i is not None and i.dtype == torch.bool for i in args[1]):
            indices = [j for i in args[1] for j in (every_index(i).unbind(1) if i is not None and
                                                    i.dtype == torch.bool else [i])]
            return func(args[0], indices)
        return func(*args, **(kwargs or {}))


def every_index(mask):
    """mask.nonzero() of an all-True mask of this shape."""
    grid = torch.meshgrid(*[torch.arange(n, device=mask.device) for n in mask.shape], indexing="ij")
    return torch.stack(grid, -1).reshape(-1, mask.dim())


class PeakMemory(TorchDispatchMode):
    """The bytes of every live tensor storage, by category, and their peak. A storage counts from the op that
    creates it until it is freed (its last reference gone, or resized to 0 as FSDP2 frees a gathered block); its
    category is the phase it was made in, unless labelled (weights, gradients, optimizer state). PyTorch's
    MemTracker does the same, but refuses a module called twice in a step - and every decode step calls it."""

    def __init__(self):
        self.storages = {}  # id(storage) -> [bytes, category]
        self.by_category, self.total, self.peak, self.at_peak = {}, 0, 0, {}
        self.phase = self.peak_phase = "rollout"

    def count(self, category, n):
        self.by_category[category] = self.by_category.get(category, 0) + n
        self.total += n
        if self.total > self.peak:
            self.peak, self.peak_phase, self.at_peak = self.total, self.phase, dict(self.by_category)

    def add(self, storage, category):
        entry = self.storages.get(id(storage))
        if entry is None:
            self.storages[id(storage)] = [storage.nbytes(), category]
            weakref.finalize(storage, self.free, id(storage))
            self.count(category, storage.nbytes())
        elif category != self.phase and entry[1] != category:  # a label wins over the phase
            self.count(entry[1], -entry[0])
            entry[1] = category
            self.count(category, entry[0])

    def free(self, key):
        n, category = self.storages.pop(key)
        self.count(category, -n)

    def resized(self, storage):
        entry = self.storages.get(id(storage))
        if entry is not None:
            self.count(entry[1], storage.nbytes() - entry[0])
            entry[0] = storage.nbytes()

    def label(self, tensors, category):
        for t in tensors:
            t = t.to_local() if isinstance(t, DTensor) else t
            if t is not None:
                self.add(t.untyped_storage(), category)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(t is DTensor for t in types):
            return NotImplemented  # let DTensor turn it into ops on the local shards, which come back here
        out = func(*args, **(kwargs or {}))
        if not self.propagating:
            self.label([t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)], self.phase)
        return out

    def __enter__(self):
        from torch.distributed.tensor._sharding_prop import ShardingPropagator
        self.propagating, resize, propagate = 0, torch.UntypedStorage.resize_, \
            ShardingPropagator._propagate_tensor_meta_non_cached

        def resize_(storage, size):
            resize(storage, size)
            self.resized(storage)

        def shapes_only(*args, **kwargs):  # DTensor working out an op's output shape on global-size stand-ins
            self.propagating += 1
            try:
                return propagate(*args, **kwargs)
            finally:
                self.propagating -= 1
        self.patches = [mock.patch.object(torch.UntypedStorage, "resize_", resize_),
                        mock.patch.object(ShardingPropagator, "_propagate_tensor_meta_non_cached", shapes_only)]
        for p in self.patches:
            p.start()
        return super().__enter__()

    def __exit__(self, *exc):
        for p in self.patches:
            p.stop()
        return super().__exit__(*exc)


@contextlib.contextmanager
def fake_world(ranks):
    """A fake process group of `ranks` ranks (this process is rank 0): collectives return at once. Its device
    mesh is made here, before fake tensors, as fully_shard would make it (its rank list must be real)."""
    if ranks == 1:
        yield
        return
    from torch.distributed.device_mesh import init_device_mesh
    from torch.testing._internal.distributed.fake_pg import FakeStore
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=ranks)
    mesh = init_device_mesh("cpu", (ranks,))
    fsdp = importlib.import_module("torch.distributed.fsdp._fully_shard._fully_shard")
    try:
        with mock.patch.object(fsdp, "_init_default_mesh", lambda: mesh):
            yield
    finally:
        dist.destroy_process_group()


def fake_model(family):
    """The model (a MEMORY_RUNS family name, or a JanusConfig / ShowOConfig) and a processor of its sizes. The
    text tokenizer is the test fixtures' (real ones are not shipped): only lengths matter here, and prompts
    tokenise to about as many ids."""
    from model import JanusProcessor, MagvitConfig, MagvitV2, ShowOTokenizer, ShowOProcessor
    fixtures = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests", "fixtures")  # shipped
    cfg = family if not isinstance(family, str) else \
        ShowOConfig(num_vq_tokens=1024) if family == "show-o-512" else JANUS_CONFIGS[family]
    if isinstance(cfg, ShowOConfig):
        magvit = MagvitV2(MagvitConfig()).eval()  # the real one at any Show-o size: it is a separate checkpoint
        return ShowO(cfg), ShowOProcessor(ShowOTokenizer(os.path.join(fixtures, "showo_tiny")), magvit,
                                          cfg.max_seq_length)
    processor = JanusProcessor(os.path.join(fixtures, "janus_tiny"), cfg)
    processor.system_prompt, processor.image_size = JANUS_SYSTEM_PROMPT, cfg.vit_image_size
    return Janus(cfg), processor


@contextlib.contextmanager
def simulation(ranks, short, fake):
    """The world a simulated step runs in -> a scratch folder for --model (the parser wants one)."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    with contextlib.ExitStack() as stack:
        folder = stack.enter_context(tempfile.TemporaryDirectory())
        stack.enter_context(fake_world(ranks))
        if fake:
            stack.enter_context(FakeTensorMode(allow_non_fake_inputs=True))
        stack.enter_context(mock.patch.object(torch.Tensor, "numpy", zeros_numpy))
        # Module.to swaps each fake parameter for its converted twin, which torch refuses while a weak reference
        # points at it - and FakeTensorMode's own memo always holds one
        stack.enter_context(mock.patch("torch.utils.weakref.getweakrefs", return_value=[]))
        if short:
            stack.enter_context(mock.patch.object(generate, "tqdm", first_decode_steps))
        stack.enter_context(mock.patch.dict(model_py._rotary_tables))  # Show-o's tables made of fakes stay here
        stack.enter_context(warnings.catch_warnings())
        warnings.filterwarnings("ignore", "Accessing the data pointer of FakeTensor")  # torch's own deepcopy does
        # tensors held in reference cycles wait for the collector, whose timing varies from run to run: none runs
        # during the step, so a figure repeats exactly (and a cycle's tensors count until the step ends)
        gc.collect()
        if gc.isenabled():
            gc.disable()
            stack.callback(gc.enable)
        yield folder


def simulate_step(family, flags, ranks, short=True, fake=True):
    """One train.py step of this configuration on fake tensors -> the PeakMemory of one GPU (rank 0).
    short: the image-token loop runs two steps (first_decode_steps); fake=False: real tensors (for the tests)."""
    import train
    with simulation(ranks, short, fake) as folder:
        args = train.build_parser().parse_args(["--model", folder, "--dtype", "bf16", "--exclude", "none",
                                                "--device", "cpu", *flags])
        model, processor = fake_model(family)
        train.resolve_defaults(args, model)
        if args.lora_rank:  # as train.setup: the base in the sampling dtype, fp32 adapters
            model.to(torch.bfloat16)
        train.make_trainable(args, model)
        # DDP's C++ reducer reads real data, so a DDP run is simulated as one process: with
        # gradient_as_bucket_view its buckets are the gradients, so a rank holds what one process holds
        train_module, objective, sampler, judge, params, optimizer = train.build_training(
            args, model, processor, torch.device("cpu"), ranks if args.fsdp else 1)
        memory = PeakMemory()
        for module in (model, sampler, objective.frozen[0], judge, getattr(processor, "vq", None)):
            if module is not None:
                memory.label([*module.parameters(), *module.buffers()], "weights")
        for group in optimizer.param_groups:  # CUDA's default: foreach kernels, with their temporaries
            group["foreach"] = True
        for p in params:  # a step past the first: Adam's state exists (one step on zero gradients makes it)
            p.grad = torch.zeros_like(p)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        memory.label([t for state in optimizer.state.values() for t in state.values()], "optimizer state")
        for p in params:
            p.register_post_accumulate_grad_hook(lambda p: memory.label([p.grad], "gradients"))
        tasks = [max(reward.make_tasks(200, 0), key=lambda t: len(t["prompt"]) + len(t["question"]))]
        autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        with memory, HostValues():
            rollouts = train.collect_rollouts(args, sampler, processor, tasks, judge, None, 0, 0, ranks,
                                              torch.device("cpu"))
            model.train()
            for ro in rollouts:
                memory.phase = "loss forward"
                with autocast:
                    loss, _ = train_module(ro)
                memory.phase = "backward"
                loss.backward()
            memory.phase = "optimizer step"
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return memory


def first_decode_steps(steps, **tqdm_kwargs):
    """generate.py's image-token loop cut to its first two steps. A decode step writes one slot of a KV cache
    allocated in full before the loop (as are the token and log-prob buffers) and frees its temporaries, so every
    step holds what the first does, but for an attention row 2 bytes a slot longer: running all 576 would cost
    minutes and change nothing. tests/test_bench.py checks that the peak equals a full run's."""
    return list(steps)[:2]


def zeros_numpy(t, *args, **kwargs):
    """Tensor.numpy for fake tensors: zeros of its shape (PIL only carries them to the ViT preprocessing)."""
    import numpy as np
    return np.zeros(t.shape, dtype=str(t.dtype).removeprefix("torch."))


MEMORY_COLUMNS = ("weights", "optimizer state", "gradients", "rollout", "loss forward", "backward", "optimizer step")


def memory_table(only=None):
    """The peak of each MEMORY_RUNS configuration, and what was alive at that moment, in GB (1e9 bytes)."""
    print("peak memory per GPU of one GRPO step (rollout + loss + backward + AdamW), simulated at full size on fake "
          "tensors;\nGB = 1e9 bytes; categories: what was alive at the peak, by the phase that made it (rollout = KV "
          "caches, images, answers)\n")
    print("| configuration | peak GB | at | " + " | ".join(MEMORY_COLUMNS) + " |")
    print("|---|---|---|" + "---|" * len(MEMORY_COLUMNS))
    for name, (family, flags, ranks) in MEMORY_RUNS.items():
        if only and only not in name:
            continue
        t0 = time.perf_counter()
        memory = simulate_step(family, flags, ranks)
        cells = " | ".join(f"{memory.at_peak.get(c, 0) / 1e9:.1f}" for c in MEMORY_COLUMNS)
        print(f"| {name} | **{memory.peak / 1e9:.1f}** | {memory.peak_phase} | {cells} |  "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)


def main():
    global BANDWIDTH
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="tiny model on the CPU (eager)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--memory", action="store_true",
                    help="peak GPU memory of a training step at full size, on fake tensors (any machine, minutes)")
    ap.add_argument("--only", help="--memory: only the configurations whose name contains this")
    args = ap.parse_args()
    if args.memory:
        return memory_table(args.only)
    device = torch.device("cpu" if args.cpu or not torch.cuda.is_available() else "cuda")
    torch.manual_seed(0)
    BANDWIDTH = copy_bandwidth(device)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    print(f"device: {name}, torch {torch.__version__}, measured copy bandwidth {BANDWIDTH / 1e9:.1f} GB/s", flush=True)
    if device.type == "cpu":
        tiny = replace(JANUS_CONFIGS["janus-pro-1b"], hidden_size=256, intermediate_size=688, num_hidden_layers=4,
                       num_attention_heads=4, num_key_value_heads=4, vocab_size=1024, gen_vocab_size=1024, vq_codebook_size=1024,
                       gen_image_size=192, vit_layers=1, vit_width=64, vit_heads=1, vq_ch=32, vq_ch_mult=(1, 1),
                       vq_z_channels=32)
        bench("tiny (CPU)", tiny, device, torch.float32, 16, 32, args.repeats)
        tiny_showo = ShowOConfig(vocab_size=1000 + 10 + 512 + 1, llm_vocab_size=1000, codebook_size=512,
                                 num_vq_tokens=64, hidden_size=256, intermediate_size=1024, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=4)
        bench_showo("tiny (CPU)", tiny_showo, device, torch.float32, 16, 33, 8, args.repeats)
    else:
        for key in ("janus-pro-1b", "janus-pro-7b"):
            bench(key, JANUS_CONFIGS[key], device, torch.bfloat16, 16, 48, args.repeats)
        showo_512 = ShowOConfig(num_vq_tokens=1024)  # Phi-1.5 sizes, MAGVIT-v2 at 512 px
        bench_showo("show-o-512", showo_512, device, torch.bfloat16, 16, 129, 16, args.repeats)


if __name__ == "__main__":
    main()
