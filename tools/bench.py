"""Speed, side by side: ours against the reference libraries (transformers, diffusers), in one process,
on the same weights and the same inputs. Each row: warm-ups, then ours and the reference in turns
(ours, ref, ours, ref, ...) so that a drift of the machine hits both, and the median of each.

    python -m tools.bench                # CPU fp32, moderately sized random models (a few minutes)
    python -m tools.bench --quick        # small models, few repeats (under a minute)
    python -m tools.bench --device cuda --real-shapes --compile  # bf16: Vicuna-7B, CLIP ViT-L/14, SD 2.1-base 512 px
    python -m tools.bench --only toy      # the main job's stage I-creation step, and where its time goes
    python -m tools.bench --only dream --real-shapes --dtype bf16 --count-memory --llm-layers 4 --repeats 1
                                         # DreamLLM-7B's training memory, on the CPU, with 4 of its 32 blocks

The reference models are built at random from our configs, and ours take their state dicts
(strict: every key). On CUDA it also reports achieved TFLOP/s (FLOPs counted by torch's
FlopCounterMode on ours: matmuls, convolutions, attention), MFU against --peak-tflops, and the peak memory
during a call (everything allocated, so both sides' weights); on the CPU, --count-memory counts the peak
bytes of live tensors the same way (LiveBytes).
The DreamLLM training step has no reference: only ours is timed.
"""
import argparse
import gc
import statistics
import time
import warnings
import weakref
from dataclasses import replace

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

import clip
import diffusion
import dreamllm
import llama
import unet
from plumbing import cli, recipes
from shapes import data

try:
    import transformers
except ImportError:
    transformers = None
try:
    import diffusers
except ImportError:
    diffusers = None

# the sizes of each mode: (LLaMA config, prompt length, new tokens), CLIP vision tower, (UNet, VAE, latent
# size, DDIM steps), DreamLLM (n_queries, image size, batch)
SIZES = {
    "quick": dict(llm=(llama.LlamaConfig(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=1024, hidden_dim=344),
                       64, 8),
                  clip=clip.TowerConfig(width=64, n_layers=2, n_heads=4, mlp_width=256, patch_size=8, image_size=64),
                  sd=(unet.UNetConfig(channels=(32, 64), cross_attn=(True, False), n_heads=(2, 4), context_dim=64,
                                      linear_proj=True, norm_groups=8, layers_per_block=1),
                      unet.VAEConfig(channels=(32, 64), norm_groups=8, layers_per_block=1), 16, 3),
                  dream=(4, 32, 2), repeats=3),
    "default": dict(llm=(llama.LlamaConfig(dim=512, n_layers=8, n_heads=8, n_kv_heads=4, vocab_size=32000,
                                           hidden_dim=1376), 256, 32),
                    clip=clip.TowerConfig(width=384, n_layers=6, n_heads=6, mlp_width=1536, patch_size=14,
                                          image_size=224),
                    sd=(unet.UNetConfig(channels=(64, 128, 256), cross_attn=(True, True, False), n_heads=(2, 4, 8),
                                        context_dim=256, linear_proj=True, norm_groups=32),
                        unet.VAEConfig(channels=(64, 128, 128, 128), norm_groups=32), 32, 10),
                    dream=(16, 128, 2), repeats=7),
    "real": dict(llm=(llama.PRESETS["vicuna-7b"], 512, 128),
                 clip=clip.PRESETS["clip-vit-large-patch14"].vision,
                 sd=(unet.PRESETS["sd-2.1-base"]["unet"], unet.PRESETS["sd-2.1-base"]["vae"], 64, 50),
                 dream=(64, 512, 1), repeats=5),
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, device):  # seconds of one call, and its peak memory (CUDA)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0, torch.cuda.max_memory_allocated() if device.type == "cuda" else 0


def flops_of(fn):
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


class LiveBytes(TorchDispatchMode):
    # The peak bytes of live tensors while it is on, counted op by op: on the CPU, a stand-in for
    # torch.cuda.max_memory_allocated (less the CUDA allocator's rounding and cuBLAS's workspace). Each
    # storage counts once, from the op that made it until Python frees it; what was alive before counts too.
    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak = {}, 0, 0
        gc.collect()
        with warnings.catch_warnings():  # (isinstance on some of torch's deprecated objects warns)
            warnings.simplefilter("ignore")
            alive = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]  # weights, optimizer state, inputs
        for t in alive:
            self.add(t)

    def add(self, t):
        if t.device.type == "meta":
            return
        storage = t.untyped_storage()
        key, n = storage.data_ptr(), storage.nbytes()
        if n and key not in self.live:
            self.live[key], self.now = n, self.now + n
            self.peak = max(self.peak, self.now)
            weakref.finalize(storage, self.free, key)

    def free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self.add(t)
        return out


def counted(fn):  # peak bytes of live tensors while fn() runs
    with LiveBytes() as live:
        fn()
    return live.peak


COMPILE = False  # --compile


def ours_ready(model, part=None):  # eval mode; with --compile, torch.compile'd in place (Module.compile)
    if COMPILE:  # `part`: the submodule whose forward is what we call (CLIP's vision tower, the VAE's decoder)
        (getattr(model, part) if part else model).compile()
    return model.eval()


def copy_weights(ours, ref, prefix=""):
    # the reference's weights into ours; their names are the official checkpoints', so they must all match
    # (transformers 5's CLIPVisionModel holds its tower without the file's "vision_model." prefix)
    state = {k if k.startswith(prefix) else prefix + k: v for k, v in ref.state_dict().items()}
    missing, unexpected = ours.load_state_dict(state, strict=False)
    unexpected = [k for k in unexpected if not k.endswith(("position_ids", "inv_freq"))]  # buffers we compute
    assert not missing and not unexpected, (missing[:3], unexpected[:3])
    return ours


# ------------------------------------------------------------------------------------------------- rows
# Each returns [(name, ours_fn, ref_fn or None, note)]: functions of no arguments that run one case.

def llama_rows(size, device, dtype, g):
    cfg, T, new = size["llm"]
    with torch.device(device):  # built in place: a 7B model never passes through the CPU
        ours = ours_ready(llama.build(cfg).to(dtype))
    ids = torch.randint(0, cfg.vocab_size, (1, T), generator=g).to(device)
    prompt = ids[:, :16]  # decoding: a short prompt, then `new` tokens
    ref = None
    if transformers:
        with torch.device(device):
            ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg.to_hf())).to(dtype).eval()
        copy_weights(ours, ref)
        ref.generation_config.eos_token_id = None
    kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    fast = ours
    if COMPILE:  # the static-cache rows: each decode step one CUDA graph (on the GPU; a plain compile on the CPU)
        with torch.device("meta"):
            fast = llama.build(cfg)
        fast.load_state_dict(ours.state_dict(), assign=True)  # a second module on the same weights
        fast.eval().compile(mode="reduce-overhead" if device.type == "cuda" else None, fullgraph=True)
    cache = fast.new_cache(prompt.shape[1] + new)  # one cache for every call, as a server would keep it
    return [
        (f"LLaMA prefill ({T} tokens)", lambda: ours(ids, cache=ours.new_cache()),
         ref and (lambda: ref(ids, use_cache=True)), "with a KV cache, logits of every position"),
        (f"LLaMA decode, per token ({new})", lambda: ours.generate(prompt, new),
         ref and (lambda: ref.generate(prompt, **kw)), f"generate: 16-token prompt + {new} greedy tokens, / {new}"),
        ("LLaMA decode, static cache", lambda: fast.generate(prompt, new, cache=cache),
         ref and (lambda: ref.generate(prompt, cache_implementation="static", **kw)),
         "both with a static cache (HF compiles its own on CUDA)"),
    ], new


def clip_rows(size, device, dtype, g):
    v = size["clip"]
    cfg = clip.CLIPConfig(vision=v, text=None, projection_dim=None)
    ours = ours_ready(clip.build(cfg).to(device, dtype), "vision_model")
    px = torch.randn(4, 3, v.image_size, v.image_size, generator=g).to(device, dtype)
    ref = None
    if transformers:
        ref = transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**cfg.vision.to_hf(text=False)))
        ref = ref.to(device, dtype).eval()
        copy_weights(ours, ref, prefix="vision_model.")
    return [("CLIP image encoding (4 images)", lambda: ours.image_features(px, layer=-1),
             ref and (lambda: ref(pixel_values=px).last_hidden_state), "every layer")]


def sd_rows(size, device, dtype, g):
    ucfg, vcfg, h, steps = size["sd"]
    with torch.device(device):
        ours_u, ours_v = ours_ready(unet.build_unet(ucfg).to(dtype)), ours_ready(unet.build_vae(vcfg).to(dtype), "decoder")
    z = torch.randn(2, 4, h, h, generator=g).to(device, dtype)  # a CFG batch: (null, cond)
    ctx = torch.randn(2, 77, ucfg.context_dim, generator=g).to(device, dtype)
    sched_cfg = unet.PRESETS["sd-2.1-base"]["scheduler"]
    ref_u = ref_v = ref_sched = None
    if diffusers:
        def strip(d):
            return {k: v for k, v in d.items() if k[0] != "_"}
        def place(m):  # (diffusers warns about .to(dtype) even when it changes nothing)
            return (m.to(device) if dtype == torch.float32 else m.to(device, dtype)).eval()
        ref_u = place(diffusers.UNet2DConditionModel(**strip(ucfg.to_diffusers())))
        ref_v = place(diffusers.AutoencoderKL(**strip(vcfg.to_diffusers())))
        copy_weights(ours_u, ref_u)
        copy_weights(ours_v, ref_v)
        ref_sched = diffusers.DDIMScheduler.from_config(sched_cfg)
    latent = z[:1] / ours_v.scaling_factor

    def ddim_ours():
        s = diffusion.DDIM(sched_cfg)
        s.set_timesteps(steps)
        x = z[:1]
        for t in s.timesteps:
            null, cond = ours_u(torch.cat([x, x]), t, ctx).chunk(2)
            x = s.step(null + 7.5 * (cond - null), t, x)
        return x

    def ddim_ref():
        ref_sched.set_timesteps(steps)
        x = z[:1]
        for t in ref_sched.timesteps:
            null, cond = ref_u(torch.cat([x, x]), t, encoder_hidden_states=ctx).sample.chunk(2)
            x = ref_sched.step(null + 7.5 * (cond - null), t, x).prev_sample
        return x

    z_cl = z.contiguous(memory_format=torch.channels_last)
    ours_cl = ours_ready(unet.build_unet(ucfg).to(device, dtype))
    ours_cl.load_state_dict(ours_u.state_dict())
    ours_cl.to(memory_format=torch.channels_last)
    return [
        (f"UNet step (2 x {h}x{h} latents)", lambda: ours_u(z, 999, ctx),
         ref_u and (lambda: ref_u(z, 999, encoder_hidden_states=ctx).sample), "a CFG batch, 77 context tokens"),
        ("UNet step, ours channels-last", lambda: ours_cl(z_cl, 999, ctx), lambda: ours_u(z, 999, ctx),
         "reference column: ours contiguous"),
        (f"VAE decode ({h}x{h} latent)", lambda: ours_v.decode(latent),
         ref_v and (lambda: ref_v.decode(latent).sample), ""),
        (f"DDIM sampling ({steps} steps, CFG)", ddim_ours, ref_u and ddim_ref, "UNet loop + scheduler, no VAE"),
    ]


def dream_row(size, device, dtype):
    # one step of stage I-creation as train.py takes it on a GPU: forward, backward, clip, AdamW; in bf16
    # (on the CPU too with --dtype bf16) the frozen parts are bf16 under autocast, the LLM checkpointed
    K, S, B = size["dream"]
    cfg, *_ = size["llm"]
    ucfg, vcfg, *_ = size["sd"]
    v = size["clip"]
    with torch.device(device):
        vision = clip.build(clip.CLIPConfig(vision=v, text=None, projection_dim=None))
        model = dreamllm.DreamLLM(llama.build(cfg), vision,
                                  unet.build_unet(ucfg), unet.build_vae(vcfg), unet.PRESETS["sd-2.1-base"]["scheduler"],
                                  dreamllm.byte_tokenizer(), dreamllm.DreamConfig(n_queries=K, image_size=S))
    half = dtype == torch.bfloat16
    model.llm.gradient_checkpointing = half
    trains = model.trainable_groups()  # train.py's stage I-creation: these groups, the rest frozen
    params = [p for g in ("dream_queries", "condition_projector") for p in trains[g]]
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=1e-4, betas=(0.9, 0.95))
    if half:
        cli.cast_frozen(model, torch.bfloat16)
    batch = model.collate([data.example("t2i", 0, e) for e in range(B)])
    batch["draws"] = model.draw_noise([torch.Generator().manual_seed(e) for e in range(B)])

    def step():
        with torch.autocast(device.type, torch.bfloat16, enabled=half):
            losses = model(**batch)
        loss = losses["diffusion"]  # stage I-creation's weights: LM 0, diffusion 1
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return [(f"DreamLLM training step (stage I, {B} docs)", step, None, "ours only: no reference exists")], model


def toy_rows():
    # Where the time of the main job's longest stage goes: one step of stage I-creation on the
    # shapes world's toy (its recipe's condition dropout), 8 captions, and its parts, each with
    # the backward it needs. Ours only; on the CPU in fp32 whatever --device says, as the main
    # job runs.
    model = cli.build_model("toy", **recipes.recipe("toy")["dream"])
    model.requires_grad_(False)
    trained = [model.dream_queries, model.condition_projector.weight]
    for p in trained:
        p.requires_grad_(True)
    batch = model.collate([data.example("t2i", 0, e) for e in range(8)])
    batch["draws"] = model.draw_noise([torch.Generator().manual_seed(e) for e in range(8)])
    with torch.no_grad():
        mean, _ = model.vae.encode(batch["vae_pixels"])
    z0, context = mean * model.vae.scaling_factor, model.condition("a red circle").detach()
    context = context.expand(8, -1, -1).clone().requires_grad_(True)

    def backward(loss):  # the gradients go nowhere: only their cost is wanted
        loss.backward()
        for p in (*trained, context):
            p.grad = None

    def llm():  # the frozen LLM, forward and back to the dream queries
        h = model.llm.hidden_states(inputs_embeds=model.embed(batch["input_ids"]))
        backward(model.slot_conditions(batch["input_ids"], h=h).square().mean())

    def unet_part():
        n = batch["draws"]
        backward(diffusion.denoising_loss(model.unet, model.noise_scheduler, z0, n["eps"], n["t"],
                                          context, "epsilon"))
    return [("toy stage I-creation step, 8 captions, CPU", lambda: backward(model(**batch)["diffusion"]),
             None, "forward and backward, no optimizer step"),
            ("  VAE encoder (frozen, no grad)", lambda: torch.no_grad()(model.vae.encode)(
                batch["vae_pixels"]), None, "SD's posterior of each picture"),
            ("  LLM forward + backward to the queries", llm, None, "the LLM frozen"),
            ("  null condition forward + backward", lambda: backward(model.condition("").square().mean()),
             None, "the queries after an empty prompt: dropout's null"),
            ("  UNet forward + backward", unet_part, None, "the denoising loss")]


def main():
    p = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0],
                                formatter_class=argparse.HelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu (fp32, the default) or cuda (bf16)")
    p.add_argument("--dtype", choices=["fp32", "bf16"], help="default: fp32 on the CPU, bf16 on CUDA")
    p.add_argument("--quick", action="store_true", help="small models, 3 repeats: under a minute on a laptop CPU")
    p.add_argument("--real-shapes", action="store_true", help="the real sizes (for a GPU): Vicuna-7B, CLIP ViT-L/14, "
                   "SD 2.1-base at 512 px, DreamLLM-7B's training step")
    p.add_argument("--compile", action="store_true", help="torch.compile ours (Module.compile, in place)")
    p.add_argument("--count-memory", action="store_true", help="on the CPU: the peak bytes of live tensors "
                   "of one more run of each side (GiB columns)")
    p.add_argument("--llm-layers", type=int, help="the LLM with this many blocks (its memory grows by one "
                   "block's weights per block)")
    p.add_argument("--repeats", type=int, help="timed runs of each side per row (default: the mode's)")
    parts = ["llama", "clip", "sd", "dream", "toy"]
    p.add_argument("--only", nargs="+", choices=parts, default=parts, help="these rows only (default: all)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's; on a loaded machine use fewer)")
    p.add_argument("--peak-tflops", type=float, default=790.0, help="the device's dense bf16 peak, for MFU (default: 790, the H200's)")
    args = p.parse_args()
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    precision = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[precision]
    size = SIZES["real" if args.real_shapes else "quick" if args.quick else "default"]
    if args.llm_layers:
        cfg, T, new = size["llm"]
        size = dict(size, llm=(replace(cfg, n_layers=args.llm_layers), T, new))
    memory = device.type == "cuda" or args.count_memory
    repeats = args.repeats or size["repeats"]
    global COMPILE
    COMPILE = args.compile
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    missing = [name for name, lib in (("transformers", transformers), ("diffusers", diffusers)) if lib is None]
    print(f"bench: {device} {str(dtype).replace('torch.', '')}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}, {'real shapes' if args.real_shapes else 'quick' if args.quick else 'default'} "
          f"sizes{f', {args.llm_layers} LLM blocks' if args.llm_layers else ''}, median of {repeats}"
          + (f"; {', '.join(missing)} not installed: ours only" if missing else ""))
    g = torch.Generator().manual_seed(0)
    header = f"{'':44s} {'ours ms':>10s} {'ref ms':>10s} {'ours/ref':>9s}"
    if device.type == "cuda":
        header += f" {'TFLOP/s':>8s} {'MFU':>6s}"
    if memory:
        header += f" {'GiB ours':>9s} {'GiB ref':>8s}"
    print(header + "  note")
    for part in args.only:
        per = 1
        with torch.no_grad() if part not in ("dream", "toy") else torch.enable_grad():
            if part == "llama":
                rows, per = llama_rows(size, device, dtype, g)
            elif part == "clip":
                rows = clip_rows(size, device, dtype, g)
            elif part == "sd":
                rows = sd_rows(size, device, dtype, g)
            elif part == "toy":
                rows = toy_rows()
            else:
                rows, _ = dream_row(size, device, dtype)
            for name, ours, ref, note in rows:
                for _ in range(2):  # warm-ups: allocator, caches, compilation
                    ours()
                    ref and ref()
                t_ours, t_ref, m_ours, m_ref = [], [], 0, 0
                for _ in range(repeats):  # in turns, so that machine drift hits both sides alike
                    t, m = timed(ours, device)
                    t_ours.append(t)
                    m_ours = max(m_ours, m)
                    if ref:
                        t, m = timed(ref, device)
                        t_ref.append(t)
                        m_ref = max(m_ref, m)
                if args.count_memory and device.type == "cpu":
                    m_ours, m_ref = counted(ours), ref and counted(ref)
                div = per if "decode" in name else 1
                a = statistics.median(t_ours) / div
                b = statistics.median(t_ref) / div if ref else None
                line = f"{name:44s} {a * 1e3:10.2f} " + \
                    (f"{b * 1e3:10.2f} {a / b:9.2f}" if b else f"{'-':>10s} {'-':>9s}")
                if device.type == "cuda":
                    tflops = flops_of(ours) / div / a / 1e12
                    line += f" {tflops:8.1f} {tflops / args.peak_tflops:6.1%}"
                if memory:
                    line += f" {m_ours / 2**30:9.2f} " + (f"{m_ref / 2**30:8.2f}" if ref else f"{'-':>8s}")
                print(line + (f"  {note}" if note else ""), flush=True)
            del rows
        if device.type == "cuda":
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
