"""Trains DreamLLM: one loop, in nanoGPT's spirit. A stage is data (STAGES below): which parameter
groups train, the weights of the two losses, the learning rate and the mix of training examples.

    python train.py                                              # the default run, into out/<preset>
    python train.py --preset tiny --steps 20 --device cpu --out out/try
    python train.py --stage I-comprehension --init out/tiny --out out/tiny-comprehension

The loss (dreamllm.py): lm_weight * CE(next token) + diffusion_weight * |unet(z_t, t, c) - target|^2,
c the projected hidden states of the dream queries. CLIP, the VAE and the UNet never train.

A run's folder (--out) holds its checkpoint, each file written atomically (a temporary file beside
it, then os.replace), so a crash or Ctrl-C never leaves a half-written file:
    model.safetensors        what the run trained, by name (DreamLLM.trained_state): all sample.py needs
    config.json              preset, stage, groups, DreamConfig, step, steps, seed, the arguments
    train_state.safetensors  AdamW's moments and step counts, for --resume
Nothing else is needed: example e of the run and the noise of step i are pure functions of (seed, e)
and (seed, i), so `--resume` ends bit-identical (on CPU) to the same run uninterrupted. A folder that
holds a checkpoint is only ever continued, with --resume and the same settings (--steps may grow, the
device may change); to start again, pick another --out or delete the folder.
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
from checkpoint import CheckpointError

DEFAULT_PRESET = "tiny"
# The official stages (DreamLLM sec. 3.2 and its code); `mix` cycles over kinds of shapes-world example.
# "new_tokens" are the embedding (and lm_head) rows of <dream_start> & co.: a frozen LLM must still
# learn to write <dream_start>, so stage I trains those rows only, as LLaVA does.
STAGES = {
    # I, alignment, the LLM frozen. Creation: the dream queries learn to drive the frozen UNet.
    "I-creation": dict(groups=["dream_queries", "condition_projector", "new_tokens"], lm_weight=1.0,
                       diffusion_weight=10.0, lr=2e-3, mix=["t2i", "t2i", "document"]),
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
            "target", "min_snr_gamma", "cond_dropout", "diffusion_weight", "lm_weight")


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


def make_optimizer(model, groups, args):
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
    decay = [p for p in params if id(p) not in no_decay]
    return params, torch.optim.AdamW([dict(params=decay, weight_decay=args.weight_decay),
                                      dict(params=[p for p in params if id(p) in no_decay], weight_decay=0.0)],
                                     lr=args.lr, betas=(0.9, 0.95))


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
    device = pick_device(args.device)
    # the loss variants: the stage's weights and the preset's DreamConfig, unless given
    weights = {k: stage[k] if getattr(args, k) is None else getattr(args, k) for k in ("lm_weight", "diffusion_weight")}
    variants = {k: v for k in ("target", "min_snr_gamma", "cond_dropout") if (v := getattr(args, k)) is not None}
    model = dreamllm.build(args.preset, seed=args.seed, **weights, **variants).to(device)
    groups = list(stage["groups"])
    if args.init:  # start from another run (e.g. stage II from stage I) and keep what it trained
        init = read_run(args.init)
        if init is None or init["preset"] != args.preset:
            raise Stop(f"--init: {args.init} holds no checkpoint of preset {args.preset}")
        model.load_trained_state(read_tensors(Path(args.init) / "model.safetensors", init["step"]))
        groups += [g for g in init["groups"] if g not in groups]
    params, opt = make_optimizer(model, stage["groups"], args)
    step = 0
    if run:
        model.load_trained_state(read_tensors(out / "model.safetensors", run["step"]))
        state = {}  # "i.key" -> tensor, back to AdamW's {"state": {i: {key: tensor}}}
        for key, t in read_tensors(out / "train_state.safetensors", run["step"]).items():
            i, name = key.split(".", 1)
            state.setdefault(int(i), {})[name] = t
        opt.load_state_dict({"state": state, "param_groups": opt.state_dict()["param_groups"]})
        step = run["step"]
    out.mkdir(parents=True, exist_ok=True)
    saved, losses = (step if run else None), {}

    def save():
        nonlocal saved
        saving.append(step)
        meta = {"step": str(step)}
        write_atomically(out / "model.safetensors", lambda f: save_file(model.trained_state(groups), str(f), meta))
        opt_state = {f"{i}.{k}": v.detach().cpu().contiguous()
                     for i, s in opt.state_dict()["state"].items() for k, v in s.items()}
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
    n = sum(t.numel() for t in model.trained_state(stage["groups"]).values())
    print(f"stage {args.stage}: training {', '.join(stage['groups'])} ({n:,} parameters) of preset {args.preset} "
          f"on {device}, steps {step}..{args.steps}, into {out}")
    bar = tqdm(total=args.steps, initial=step, desc=f"stage {args.stage}", unit="step", dynamic_ncols=True)
    t0, first = time.perf_counter(), step
    try:
        while step < args.steps:
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr
            g = torch.Generator().manual_seed(args.seed * 2**32 + step)  # dropout, noise, t of this step
            totals = dict(loss=0.0, lm=0.0, diffusion=0.0)
            for micro in range(args.grad_accum):
                first_e = (step * args.grad_accum + micro) * args.batch_size  # example e = a pure function of step
                batch = model.collate([example(e) for e in range(first_e, first_e + args.batch_size)])
                with autocast(device):
                    loss = model(batch, g)
                if not torch.isfinite(loss["loss"]):
                    raise Stop(f"step {step + 1}: the loss is {loss['loss'].item()}; stopped ({kept()})")
                (loss["loss"] / args.grad_accum).backward()
                for k in totals:
                    totals[k] += loss[k].item() / args.grad_accum
            norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(norm):
                raise Stop(f"step {step + 1}: the gradient norm is {norm.item()}; stopped ({kept()})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            step, losses = step + 1, totals
            rate = (step - first) / (time.perf_counter() - t0)
            bar.update()
            bar.set_postfix(loss=f"{totals['loss']:.4f}", lm=f"{totals['lm']:.3f}", diff=f"{totals['diffusion']:.4f}",
                            lr=f"{lr:.1e}")
            if step % args.log_every == 0 or step == args.steps:
                tqdm.write(f"step {step}/{args.steps}  loss {totals['loss']:.4f}  lm {totals['lm']:.4f}  "
                           f"diffusion {totals['diffusion']:.4f}  lr {lr:.2e}  {rate:.2f} steps/s")
            if step == args.steps or step == args.stop_after or step % args.save_every == 0 or interrupted:
                save()
            if interrupted:
                raise Stop(f"interrupted: saved step {step} to {out}; continue with --resume")
            if step == args.stop_after:
                print(f"stopped after step {step} (--stop-after); saved to {out}; continue with --resume")
                return
        print(f"done: {step} steps, saved to {out}")
    except KeyboardInterrupt:
        raise Stop(f"interrupted at step {step}; {kept()}") from None
    finally:
        bar.close()
        signal.signal(signal.SIGINT, previous)


def parse_args(argv=None):
    p = Parser(description="Train DreamLLM (a stage of it) and checkpoint it.", formatter_class=Help)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=[k for k in dreamllm.PRESETS], help="the backbones")
    p.add_argument("--stage", default="I-creation", choices=list(STAGES), help="what trains, with which losses")
    p.add_argument("--steps", type=int, default=200, help="the run's length: the lr schedule spans it")
    p.add_argument("--stop-after", type=int, help="checkpoint and exit after this step, as an interruption would")
    p.add_argument("--batch-size", type=int, default=8, help="documents per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: 5%% of --steps, at most 100)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, on weight matrices only")
    p.add_argument("--device", default="auto", help="auto: cuda (bf16 autocast), else mps, else cpu (fp32)")
    p.add_argument("--out", help="the run's folder (default: out/<preset>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", help="start from the trained state of another run's folder (e.g. stage I's)")
    p.add_argument("--seed", type=int, default=0, help="the initialisation, the data order and the noise")
    p.add_argument("--data", default="shapes", help="'shapes' (the shapes world) or a JSONL manifest of "
                   "interleaved documents (see data.py), read into memory once")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="print the losses every this many steps")
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
