"""Trains DreamLLM: one loop, in nanoGPT's spirit. A stage is data (STAGES below): which parameter
groups train, the weights of the two losses, the learning rate and the mix of training examples.

    python train.py                                              # the default run, into out/<preset>
    python train.py --preset tiny --steps 20 --device cpu --out out/try
    python train.py --stage I-comprehension --init out/tiny --out out/tiny-comprehension
    torchrun --nproc_per_node 2 train.py --device cpu --batch-size 8     # 2 processes, 4 documents each
    torchrun --nproc_per_node 8 train.py --preset dreamllm-7b --stage II --fsdp --checkpointing --compile

The loss (dreamllm.py): lm_weight * CE(next token) + diffusion_weight * |unet(z_t, t, c) - target|^2,
c the projected hidden states of the dream queries. CLIP, the VAE and the UNet never train.

A run's folder (--out) holds its checkpoint, each file written atomically (a temporary file beside
it, then os.replace), so a crash or Ctrl-C never leaves a half-written file:
    model.safetensors        what the run trained, by name (DreamLLM.trained_state): all sample.py needs
    config.json              preset, stage, groups, DreamConfig, step, steps, seed, the arguments
    train_state.safetensors  AdamW's moments and step counts, for --resume
Nothing else is needed: example e of the run and its noise are pure functions of (seed, e), so
`--resume` ends bit-identical (on CPU) to the same run uninterrupted, and under torchrun each process
takes a slice of the same global batch: N processes give the losses of one (to float rounding; see
parallel.py). A folder that holds a checkpoint is only ever continued, with --resume and the same
settings (--steps may grow, the device may change); to start again, pick another --out or delete it.
"""
import argparse
import functools
import json
import math
import os
import random
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file
from tqdm import tqdm

import data
import dreamllm
import parallel
from checkpoint import CheckpointError

DEFAULT_PRESET = "toy"  # the shapes world: what `python train.py` trains (weights/toy/)
# The official stages (DreamLLM sec. 3.2 and its code); `mix` cycles over kinds of shapes-world example.
# "new_tokens" are the embedding (and lm_head) rows of <dream_start> & co.: a frozen LLM must still
# learn to write <dream_start>, so stage I trains those rows only, as LLaVA does.
STAGES = {
    # I, alignment, the LLM frozen, on image-text pairs. Creation: the dream queries learn to drive the
    # frozen UNet from captions written before their image ("a red circle <image>"). (Documents would teach
    # little here: an image described only after it gives the diffusion loss a condition that knows nothing.)
    "I-creation": dict(groups=["dream_queries", "condition_projector", "new_tokens"], lm_weight=1.0,
                       diffusion_weight=10.0, lr=2e-3, mix=["t2i"]),
    # Comprehension: the visual projector learns to show the LLM what CLIP sees; no diffusion loss.
    "I-comprehension": dict(groups=["visual_projector", "new_tokens"], lm_weight=1.0, diffusion_weight=0.0,
                            lr=2e-3, mix=["i2t", "vqa"]),
    "I": dict(groups=["dream_queries", "condition_projector", "visual_projector", "new_tokens"], lm_weight=1.0,
              diffusion_weight=10.0, lr=2e-3, mix=["t2i", "vqa", "t2i", "i2t", "document", "vqa"]),
    # II, I-GPT: everything but CLIP and SD, on interleaved documents; III, supervised fine-tuning.
    "II": dict(groups=["dream_queries", "condition_projector", "visual_projector", "llm"], lm_weight=1.0,
               diffusion_weight=10.0, lr=2e-5, mix=["document", "t2i", "vqa", "i2t"]),
    "III": dict(groups=["dream_queries", "condition_projector", "visual_projector", "llm"], lm_weight=1.0,
                diffusion_weight=10.0, lr=4e-5, mix=["vqa", "t2i", "document"]),
}
# the arguments that define a run: --resume refuses to change them
RUN_ARGS = ("preset", "stage", "seed", "batch_size", "grad_accum", "lr", "warmup", "weight_decay", "data", "init",
            "target", "min_snr_gamma", "cond_dropout", "diffusion_weight", "lm_weight", "no_whiten")


class Stop(Exception):  # a one-line error for the user, no traceback
    pass


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (see -h for the usage), exit status 2 as argparse's
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):  # "(default: ...)" where there is one to show
    def _get_help_string(self, action):
        plain = action.default is None or action.default is False or "default" in (action.help or "")
        return action.help if plain else super()._get_help_string(action)


# ------------------------------------------------------------------------------------------------- data

def shapes_example(kind, seed, i):
    # example i of a kind -> (text with <image> placeholders, [PIL images]); split "train" never shows
    # data.HELD_OUT, which sample.py --eval asks for
    if kind == "document":  # interleaved: images written after their description, or read before it
        text, scenes = data.document_example(seed, i)
        return text, [data.draw(s) for s in scenes]
    if kind == "vqa":
        scene, question, answer = data.question_example(seed, i)
        return f"{data.IMAGE_TOKEN} {question} {answer}", [data.draw(scene)]
    text, scene = data.caption_example(seed, i)
    # text -> image ("a red circle <image>": the model writes it) or image -> text (reads it)
    return (f"{text} {data.IMAGE_TOKEN}" if kind == "t2i" else f"{data.IMAGE_TOKEN} {text}"), [data.draw(scene)]


def example_source(args, stage):
    # e -> example e of the run, a pure function of (seed, e): resuming needs only the step
    if args.data == "shapes":
        mix = stage["mix"]
        return lambda e: shapes_example(mix[e % len(mix)], args.seed, e)
    if not Path(args.data).is_file():
        raise Stop(f"--data {args.data}: no such file (give 'shapes' or a JSONL manifest of documents)")
    docs = list(data.read_documents(args.data))  # a manifest of your own, read once, reshuffled every epoch
    if not docs:
        raise Stop(f"{args.data}: no documents")

    @functools.lru_cache(maxsize=2)
    def order(epoch):
        o = list(range(len(docs)))
        random.Random(f"{args.seed}/{epoch}").shuffle(o)
        return o
    return lambda e: docs[order(e // len(docs))[e % len(docs)]]


# --------------------------------------------------------------------------------------------- helpers

def pick_device(name="auto"):
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("mps" if torch.backends.mps.is_available() else "cpu")


def autocast(device):  # bf16 on CUDA; fp32 elsewhere
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def lr_at(step, args):  # linear warmup, then cosine down to a tenth at --steps
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))


def write_atomically(path, write):
    # write(tmp) then rename: readers (and a resumed run) see the old file or the new one, never half of one
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def read_run(folder):
    # a run's config.json, or None if the folder holds no checkpoint (config.json is written last)
    path = Path(folder) / "config.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise Stop(f"{path}: unreadable ({e})") from None


def read_tensors(path, step=None):
    # a checkpoint's tensors; each file records its step, which must be config.json's
    try:
        with safe_open(path, "pt") as f:
            saved = (f.metadata() or {}).get("step")
        tensors = load_file(path)
    except (OSError, SafetensorError) as e:
        raise Stop(f"{path}: unreadable ({e})") from None
    if saved != str(step):
        raise Stop(f"{path} is of step {saved}, its config.json of step {step}: a save was interrupted")
    return tensors


def cast_frozen(model, dtype):
    # on the GPU the frozen weights (CLIP, the VAE, the UNet, a frozen LLM's blocks) are kept in bf16:
    # half the memory and the bandwidth; what trains is fp32 (AdamW's small updates vanish in bf16),
    # also when it was loaded in bf16, as the official release is
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def make_optimizer(model, groups, args, whitening=None):
    # Only the stage's groups train. AdamW; no weight decay on the dream queries, the new token rows,
    # biases and norms. New rows without the LLM: the gradient of the old rows is zeroed, so (with no
    # decay) Adam leaves them bit-identical.
    by_group = model.trainable_groups()
    params, no_decay = [], set()
    for g in groups:
        for p in by_group[g]:
            if all(p is not q for q in params):
                params.append(p)
            if (g in ("dream_queries", "new_tokens") and "llm" not in groups) or p.ndim < 2:
                no_decay.add(id(p))
    model.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    if "new_tokens" in groups and "llm" not in groups:
        for p in by_group["new_tokens"]:
            keep = (torch.arange(p.shape[0], device=p.device) >= model.n_text_vocab)[:, None]  # (V, 1)
            p.register_hook(lambda grad, keep=keep: grad * keep)
    if whitening:  # AdamW steps W' in the projector's place (W gets the gradient, then hands it to W')
        params = [whitening.prime if p is whitening.weight else p for p in params]
    slow = [p for p in params if whitening and p is model.dream_queries]  # at lr * Whitening.QUERY_LR
    decay = [p for p in params if id(p) not in no_decay]
    rest = [p for p in params if id(p) in no_decay and all(p is not q for q in slow)]
    param_groups = [dict(params=decay, weight_decay=args.weight_decay), dict(params=rest, weight_decay=0.0)]
    param_groups += [dict(params=slow, weight_decay=0.0, lr_scale=Whitening.QUERY_LR)] if slow else []
    return params, torch.optim.AdamW(param_groups, lr=args.lr, betas=(0.9, 0.95))


class Whitening:
    """Trains the condition projector W (C, D) in whitened coordinates: AdamW steps W' and W = W' Z, with
    Z = (E[h h^T] + eps)^(-1/2) over the dream queries' states h after the run's first prompts, measured
    once at the start with the LLM frozen. W stays one linear map, saved as the release's projector.
    Why: a frozen LLM's states at the query positions are nearly parallel (in the toy, the prompt moves
    them by 16% of their norm; the rest is the same for every prompt), and AdamW, which scales each entry
    of W alone, then learns the few directions that name a colour or a shape many times too slowly.
    A fresh projector's random init is taken as W' (W = W_init Z: a condition of the usual scale, read from
    states of unit scale); a trained one (--init, keep=True) is kept as it is (W' = W Z^-1).
    The dream queries train at a tenth of the lr meanwhile: Z was measured for the states of the queries
    at the start, and W's large gain along the directions those states barely use draws the queries'
    gradient there (at the full lr, the toy's held-out colour accuracy fell from 0.94 to 0.34).
    EPS (relative to the largest eigenvalue) keeps the directions the states barely use from being blown
    up to unit scale: in the toy they mostly tell the training combinations apart (the toy's
    held-out colour after 3000 steps: 0.89 at 1e-6, 0.97 at 1e-5; at 1e-2 nothing is learnt)."""
    N_PROMPTS = 256
    QUERY_LR = 0.1
    EPS = 1e-5

    def __init__(self, model, example, saved=None, keep=False):
        self.weight = model.condition_projector.weight  # (C, D)
        if saved is None:  # the text before each example's first image: what a dream slot follows
            with torch.no_grad():
                h = torch.cat([model.dream_states(text.split(data.IMAGE_TOKEN)[0])[0].double()
                               for text, _ in map(example, range(self.N_PROMPTS))])  # (N K, D)
                e, V = torch.linalg.eigh(h.T @ h / len(h))  # in float64: e spans six orders of magnitude
                Z = V @ torch.diag((e.clamp(min=0) + self.EPS * e.max()).rsqrt()) @ V.T  # (D, D)
                Z = ((Z + Z.T) / 2).float()  # symmetric to the last bit, as grad_to_prime assumes
                W = self.weight.detach().float().clone()  # not a view: update() writes the weight
            saved = {"Z": Z, "prime": W @ torch.linalg.inv(Z) if keep else W}
        self.Z = saved["Z"].to(self.weight.device)
        self.prime = torch.nn.Parameter(saved["prime"].to(self.weight.device))  # W', what AdamW steps
        self.update()

    def state(self):  # saved with the optimizer's: resuming goes on from the same W' and Z
        return {"whitening.Z": self.Z.cpu(), "whitening.prime": self.prime.detach().cpu()}

    def grad_to_prime(self):  # dL/dW' = dL/dW Z^T (Z is symmetric); none when no image was in the batch
        self.prime.grad = None if self.weight.grad is None else self.weight.grad.float() @ self.Z

    @torch.no_grad()
    def update(self):  # after each optimizer step: W = W' Z
        self.weight.copy_(self.prime @ self.Z)
        self.weight.grad = None  # not the optimizer's, so not cleared by it


# ------------------------------------------------------------------------------------------- the loop

def train(args):
    stage, given = STAGES[args.stage], dict(vars(args))  # the arguments as given, saved and compared on resume
    out = Path(args.out or f"out/{args.preset}")
    args.lr = stage["lr"] if args.lr is None else args.lr
    args.warmup = min(100, args.steps // 20) if args.warmup is None else args.warmup
    run = read_run(out)
    if args.resume and run is None:
        raise Stop(f"--resume: {out} holds no checkpoint to continue")
    if run is not None and not args.resume:
        raise Stop(f"{out} already holds a run (stage {run['stage']}, step {run['step']} of {run['steps']}): "
                   "continue it with --resume, or pick another --out")
    for key in RUN_ARGS if run else ():
        if run["args"].get(key) != given[key]:
            was, now = (v if v is not None else "(not given)" for v in (run["args"].get(key), given[key]))
            raise Stop(f"--resume: {out} is a run with --{key.replace('_', '-')} {was}, not {now}")
    if run and run["step"] >= args.steps:
        print(f"{out}: already trained for {run['step']} steps (--steps {args.steps}); nothing to do")
        return

    example = example_source(args, stage)
    rank, world, device = parallel.init_distributed(pick_device(args.device))
    if args.batch_size < world:
        raise Stop(f"--batch-size {args.batch_size} (the global batch) is smaller than the {world} processes")
    if args.fsdp and "llm" not in stage["groups"]:
        raise Stop(f"--fsdp shards the LLM, which stage {args.stage} does not train (use plain data parallel)")
    say = print if rank == 0 else (lambda *a, **k: None)  # one process speaks and writes
    # the loss variants: the stage's weights and the preset's DreamConfig, unless given
    weights = {k: stage[k] if getattr(args, k) is None else getattr(args, k) for k in ("lm_weight", "diffusion_weight")}
    variants = {k: v for k in ("target", "min_snr_gamma", "cond_dropout") if (v := getattr(args, k)) is not None}
    model = dreamllm.build(args.preset, seed=args.seed, **weights, **variants).to(device)
    groups, inherited = list(stage["groups"]), []
    if args.init:  # start from another run (e.g. stage II from stage I) and keep what it trained
        init = read_run(args.init)
        if init is None or init["preset"] != args.preset:
            raise Stop(f"--init: {args.init} holds no checkpoint of preset {args.preset}")
        model.load_trained_state(read_tensors(Path(args.init) / "model.safetensors", init["step"]))
        groups += [g for g in init["groups"] if g not in groups]
        inherited = init["groups"]
    if run:
        model.load_trained_state(read_tensors(out / "model.safetensors", run["step"]))
    model.llm.gradient_checkpointing = args.checkpointing
    n = sum(t.numel() for t in model.trained_state(stage["groups"]).values())
    units = parallel.shard_llm(model) if args.fsdp else []
    whitening, opt_tensors = None, read_tensors(out / "train_state.safetensors", run["step"]) if run else {}
    if "condition_projector" in stage["groups"] and "llm" not in groups and not args.no_whiten:
        saved = {k.split(".", 1)[1]: opt_tensors.pop(k) for k in list(opt_tensors) if k.startswith("whitening.")}
        whitening = Whitening(model, example, saved or None, keep="condition_projector" in inherited)
    params, opt = make_optimizer(model, stage["groups"], args, whitening)
    if device.type == "cuda":
        cast_frozen(model, torch.bfloat16)
    if args.compile:  # in place (Module.compile), so parameter names and checkpoints stay the same
        for m in [*model.llm.model.layers, model.unet]:
            m.compile()
    step = 0
    if run:
        state, flat = {}, [p for g in opt.param_groups for p in g["params"]]  # "i.key" -> AdamW's {i: {key: t}}
        for key, t in opt_tensors.items():
            i, name = key.split(".", 1)
            if hasattr(flat[int(i)], "device_mesh") and t.shape == flat[int(i)].shape:  # FSDP: this process's shard
                from torch.distributed.tensor import distribute_tensor
                t = distribute_tensor(t.to(device), flat[int(i)].device_mesh, flat[int(i)].placements)
            state.setdefault(int(i), {})[name] = t
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        step = run["step"]
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    saved, losses = (step if run else None), {}

    def save():  # every process gathers (FSDP's shards), process 0 writes
        nonlocal saved
        saving.append(step)
        meta = {"step": str(step)}
        for u in units:
            u.unshard()  # full parameters in place of the shards, for trained_state
        trained = model.trained_state(groups)
        for u in units:
            u.reshard()
        opt_state = {f"{i}.{k}": (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
                     for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
        opt_state |= whitening.state() if whitening else {}
        if rank == 0:
            write_atomically(out / "model.safetensors", lambda f: save_file(trained, str(f), meta))
            write_atomically(out / "train_state.safetensors", lambda f: save_file(opt_state, str(f), meta))
            config = dict(preset=args.preset, stage=args.stage, groups=groups, step=step, steps=args.steps,
                          seed=args.seed, dream_config=asdict(model.config), losses=losses, args=given)
            write_atomically(out / "config.json", lambda f: f.write_text(json.dumps(config, indent=2) + "\n"))
        saved = step
        saving.clear()

    def kept():
        return f"the last good checkpoint, step {saved}, is kept in {out}" if saved else "no checkpoint was written"

    # Ctrl-C: finish the step, save, exit; a second Ctrl-C stops at once (the last checkpoint is kept),
    # unless it falls during a save: the three files must stay of one step
    interrupted, saving = [], []

    def on_sigint(signum, frame):
        if interrupted and not saving:
            raise KeyboardInterrupt
        interrupted.append(step)
        tqdm.write("Ctrl-C: saving after this step (again to quit without saving)")
    previous = signal.signal(signal.SIGINT, on_sigint)
    say(f"stage {args.stage}: training {', '.join(stage['groups'])} ({n:,} parameters) of preset {args.preset} "
        f"on {device}{f' x {world} processes' if world > 1 else ''}, steps {step}..{args.steps}, into {out}")
    bar = tqdm(total=args.steps, initial=step, desc=f"stage {args.stage}", unit="step", dynamic_ncols=True,
               disable=True if rank > 0 else None)  # None: no bar into a log file; the step lines remain
    lo, hi = args.batch_size * rank // world, args.batch_size * (rank + 1) // world  # this process's slice
    t0, first = time.perf_counter(), step
    try:
        while step < args.steps:
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            totals = torch.zeros(4, dtype=torch.float64, device=device)  # loss, lm, diffusion, Ctrl-C
            for micro in range(args.grad_accum):
                first_e = (step * args.grad_accum + micro) * args.batch_size  # example e = a pure function of step
                docs = [(e, example(e)) for e in range(first_e + lo, first_e + hi)]
                batch = model.collate([doc for _, doc in docs])
                # dropout, noise and t of each image from its example's own generator: the same in any process
                gens = [torch.Generator().manual_seed(args.seed * 2**32 + e) for e, _ in docs]
                gens = [g for g, (_, (_, images)) in zip(gens, docs) for _ in images]
                with autocast(device):
                    loss = model(batch, gens)
                if world == 1:
                    objective, share = loss["loss"], torch.ones(2, device=device)
                else:  # this slice's share of the global batch's label tokens and images
                    counts = torch.tensor([(batch["labels"][:, 1:] != -100).sum().item(), len(batch["images"])],
                                          device=device)
                    share = (counts / parallel.all_sum(counts.clone(), world).clamp(min=1)).float()
                    objective = model.config.lm_weight * loss["lm"] * share[0] + \
                        model.config.diffusion_weight * loss["diffusion"] * share[1]
                (objective / args.grad_accum).backward()
                parts = torch.stack([objective, loss["lm"] * share[0], loss["diffusion"] * share[1]]).detach()
                totals[:3] += parts.double() / args.grad_accum
            totals[3] = float(bool(interrupted))
            totals = dict(zip(["loss", "lm", "diffusion", "interrupted"], parallel.all_sum(totals, world).tolist()))
            if not math.isfinite(totals["loss"]):  # every process sees the same sums: all stop together
                raise Stop(f"step {step + 1}: the loss is {totals['loss']}; stopped ({kept()})")
            if whitening:
                whitening.grad_to_prime()
            parallel.sync_grads(params, world)
            norm = parallel.clip_grads(params, 1.0, world) if args.fsdp else torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(norm):
                raise Stop(f"step {step + 1}: the gradient norm is {norm.item()}; stopped ({kept()})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if whitening:
                whitening.update()
            step, losses = step + 1, {k: totals[k] for k in ("loss", "lm", "diffusion")}
            stop = totals.pop("interrupted") > 0  # any process's Ctrl-C stops them all, after the same step
            rate = (step - first) / (time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{totals['loss']:.4f}", lm=f"{totals['lm']:.3f}", diff=f"{totals['diffusion']:.4f}",
                            lr=f"{lr:.1e}")
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                tqdm.write(f"step {step}/{args.steps}  loss {totals['loss']:.4f}  lm {totals['lm']:.4f}  "
                           f"diffusion {totals['diffusion']:.4f}  lr {lr:.2e}  {rate:.2f} steps/s")
            if step == args.steps or step == args.stop_after or step % args.save_every == 0 or stop:
                save()
            if stop:
                raise Stop(f"interrupted: saved step {step} to {out}; continue with --resume")
            if step == args.stop_after:
                say(f"stopped after step {step} (--stop-after); saved to {out}; continue with --resume")
                return
        say(f"done: {step} steps, saved to {out}")
    except KeyboardInterrupt:
        raise Stop(f"interrupted at step {step}; {kept()}") from None
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)
        if world > 1:
            torch.distributed.destroy_process_group()


def parse_args(argv=None):
    p = Parser(description="Train DreamLLM (a stage of it) and checkpoint it.", formatter_class=Help)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=[k for k in dreamllm.PRESETS], help="the backbones")
    p.add_argument("--stage", default="I-creation", choices=list(STAGES), help="what trains, with which losses")
    p.add_argument("--steps", type=int, default=3000, help="the run's length: the lr schedule spans it")
    p.add_argument("--stop-after", type=int, help="checkpoint and exit after this step, as an interruption would")
    p.add_argument("--batch-size", type=int, default=8, help="documents per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: 5%% of --steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, on weight matrices only")
    p.add_argument("--no-whiten", action="store_true", help="train the condition projector as it is, not in "
                   "whitened coordinates (see Whitening; stages with the LLM frozen whiten by default)")
    p.add_argument("--device", default="auto", help="auto: cuda (bf16 autocast), else mps, else cpu (fp32)")
    p.add_argument("--out", help="the run's folder (default: out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", help="start from the trained state of another run's folder (e.g. stage I's)")
    p.add_argument("--seed", type=int, default=0, help="the initialisation, the data order and the noise")
    p.add_argument("--data", default="shapes", help="'shapes' (the shapes world) or a JSONL manifest of "
                   "interleaved documents (see data.py), read into memory once")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="print the losses every this many steps")
    speed = p.add_argument_group("speed and scale (under torchrun, --batch-size is the global batch)")
    speed.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the LLM's blocks")
    speed.add_argument("--compile", action="store_true", help="torch.compile the LLM's blocks and the UNet")
    speed.add_argument("--fsdp", action="store_true", help="shard the LLM across the processes (FSDP2; stages "
                       "that train it), instead of a copy per process")
    loss = p.add_argument_group("loss variants (DreamConfig; default: the stage's and the preset's)")
    loss.add_argument("--target", choices=["epsilon", "v", "x0"], help="the space of the diffusion MSE")
    loss.add_argument("--min-snr-gamma", type=float, help="min-SNR-gamma weighting, e.g. 5")
    loss.add_argument("--cond-dropout", type=float, help="P(condition -> null condition), trains CFG")
    loss.add_argument("--diffusion-weight", type=float, help="lambda on the diffusion loss")
    loss.add_argument("--lm-weight", type=float, help="weight of the LM cross-entropy")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    try:
        train(args)
    except (Stop, CheckpointError, FileNotFoundError, ValueError) as e:
        print(f"train.py: {e}", file=sys.stderr)
        sys.exit(130 if "interrupted" in str(e) else 1)
    except KeyboardInterrupt:  # before the loop began
        print("train.py: interrupted before training began; nothing saved", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
