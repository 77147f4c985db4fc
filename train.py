"""Trains DreamLLM: one loop, in nanoGPT's spirit. A stage is data (plumbing/recipes.py's STAGES):
which parameter groups train, the weights of the loss's terms, the learning rate and the mix of
training examples.

    python train.py                 # the main job: the four-stage curriculum, into out/toy/
    python train.py --stage II --init out/toy/I-creation            # one stage, into out/toy-II
    python train.py --preset tiny --stage I-creation --steps 20 --device cpu --out out/try
    python train.py --preset tiny --stage I-comprehension --init out/try --out out/tiny-comprehension
    torchrun --nproc_per_node 2 train.py --device cpu --batch-size 8     # 2 processes, 4 documents each
    torchrun --nproc_per_node 8 train.py --preset dreamllm-7b --stage II --fsdp --checkpointing --compile

The loss (step_loss): w_lm * CE(next token) + w_diffusion * |unet(z_t, t, c) - target|^2, plus the
toy's anchor w_anchor * |c - c_0|^2 where the stage has one (dreamllm.py returns the terms, the
stage weighs them), c the projected hidden states of the dream queries. CLIP, the VAE and the UNet
never train. (--objective align or both: the peers' alignment in place of the diffusion term or
beside it, plumbing/alignment.py; the toy's recipe has both.)

A run's folder (--out) holds its newest checkpoint, step-<N>/ (plumbing/checkpoint.py: written
whole, then renamed, so a crash or a full disk at any moment leaves the last whole one). Example e
of the run and its noise are pure functions of (seed, e), so `--resume` ends bit-identical (on CPU)
to the same run uninterrupted, and under torchrun each process takes a slice of the same global
batch: N processes give the losses of one (to float rounding; see plumbing/parallel.py). A folder
that holds a checkpoint is only ever continued, with --resume and the same settings (--steps may
grow, the device may change), under the stage's recipe as it was (a changed one is refused, also
where the curriculum would skip the stage as done).
Ctrl-C or SIGTERM: the step finishes, the run saves and exits (status 130).
"""
import argparse
import copy
import functools
import json
import math
import random
import time
from pathlib import Path

import torch
from tqdm import tqdm

import dreamllm
from plumbing import alignment, checkpoint, cli, memo, parallel
from plumbing.cli import Interrupted, Stop
from plumbing.recipes import CURRICULA, DEFAULT_PRESET, STAGES, cycle, recipe, stage_of
from plumbing.whitening import Whitening
from shapes import data

PER_STAGE = ("steps", "groups", "lr", "warmup", "init", "mix", "lm_weight", "diffusion_weight",
             "anchor_weight", "score_every", "stop_after")


# the flags that set a DreamConfig field (default: the preset's recipe's, else the preset's own)
DREAM_FLAGS = ("target", "min_snr_gamma", "cond_dropout", "dropout_null", "lm_mean", "objective",
               "align_weight", "align_distance", "bridge", "n_queries")
# the arguments that define a run: --resume refuses to change them
RUN_ARGS = ("preset", "stage", "seed", "groups", "batch_size", "grad_accum", "lr", "warmup", "weight_decay",
            "data", "mix", "init", "diffusion_weight", "lm_weight", "anchor_weight", "score_every",
            "whiten", *DREAM_FLAGS)


# ------------------------------------------------------------------------------------------- the loop

def curriculum(args):
    # --stage all: each stage of the preset's curriculum in turn, each from the last one's folder
    if args.preset not in CURRICULA:
        raise Stop(f"preset {args.preset} has no curriculum here; train one stage at a time with "
                   f"--stage ({', '.join(STAGES)})")
    if given := [k for k in PER_STAGE if getattr(args, k) is not None]:
        raise Stop(f"--{given[0].replace('_', '-')} sets one stage: give it with --stage (the "
                   "curriculum takes each stage's from CURRICULA and the recipe)")
    root, init = Path(args.out or f"out/{args.preset}"), None
    if root.exists() and not root.is_dir():
        raise Stop(f"--out {root} is a file, not a folder; pick another --out")
    if (run := checkpoint.read_run(root)) is not None:  # its stages go in folders of their own
        raise Stop(f"--out {root} holds a run of stage {run['stage']}, not a curriculum; pick "
                   "another --out")
    stages = [name for name, _ in CURRICULA[args.preset]]
    root.mkdir(parents=True, exist_ok=True)  # what sample.py reads to find the final stage
    (root / "curriculum.json").write_text(json.dumps(dict(preset=args.preset, stages=stages)) + "\n")
    for name, steps in CURRICULA[args.preset]:
        stage_args = argparse.Namespace(**vars(args))
        stage_args.stage, stage_args.steps, stage_args.init = name, steps, init
        stage_args.out = str(root / name)
        # a stage done is reopened only to be checked and skipped; one begun, with --resume
        run = checkpoint.read_run(stage_args.out)
        stage_args.resume = run is not None and (args.resume or run["step"] >= steps)
        train(stage_args)
        init = stage_args.out
    print(f"the curriculum is done: the final model is {init}")


def train(args):
    run, out, stage = open_run(args)
    if run and run["step"] >= args.steps:
        return print(f"{out}: already trained for {run['step']} steps (--steps {args.steps})")
    rank, world, device = parallel.init_distributed(cli.pick_device(args.device))
    example, weights = example_source(args, stage), loss_weights(args, stage)
    model, groups, params, opt, step, ckpt, anchor = setup(args, stage, run, out, example, rank,
                                                           world, device, weights)
    say = print if rank == 0 else (lambda *a, **k: None)  # one process speaks and writes
    # the shapes world's pictures and captions come back: what the frozen encoders make of each is
    # computed once (plumbing/memo.py); a real corpus's rarely come back
    memos = memo.remember(model) if args.data == "shapes" else {}
    lo, hi = args.batch_size * rank // world, args.batch_size * (rank + 1) // world  # my slice
    # the score (the UNet's denoising loss) on every k-th step only, weighted k, where the flag or
    # the stage says so: the same loss in expectation, its costliest term sampled. The stage's k
    # holds where the alignment trains the condition on the steps between (objective "both")
    every = args.score_every or (stage.get("score_every", 1) if weights["align"] > 0 else 1)
    scored_weights = weights | dict(diffusion=weights["diffusion"] * every)
    flip = recipe(args.preset)["random_flip"]

    def collate(es, examples, scored):  # examples es of the run -> one batch, a function of (seed, es)
        # the images written (dream slots), by example: each one's noise from its example's own
        # generator, and its mirror coin from its own stream, so any process draws the same
        dreamt = [(e, j) for e, (text, _, layout, reply) in zip(es, examples)
                  for j, slots in enumerate(dreamllm.DreamLLM.image_slots(text, layout, reply))
                  if "dream" in slots]  # (example, image)
        flips = [flip and random.Random(f"{args.seed}/flip/{e}/{j}").random() < 0.5 for e, j in dreamt]
        batch = model.collate(examples, diffusion=weights["diffusion"] > 0 and scored, flips=flips)
        batch["pairs"] = [k for k, (*_, layout, _) in enumerate(examples) if layout == "t2i"]
        # an opening ("Here is X. <image>") is held and aligned as its bare caption ("X <image>"):
        # the toy SD draws held-out pairs from E(X) 64 of 64 times, from E("Here is X.") 50
        bare = [data.unframe(examples[k][0]) for k in batch["pairs"]]
        # the anchor holds a pair to its own condition at the stage's start (its bare caption's)
        if weights["anchor"] > 0 and bare != [examples[k][0] for k in batch["pairs"]]:
            held = [(b, examples[k][1], "t2i", "") for b, k in zip(bare, batch["pairs"])]
            batch["held_ids"] = model.collate(held, diffusion=False)["input_ids"]
        if weights["align"] > 0 and batch["pairs"]:  # what the alignment regresses pairs onto
            slots = pair_slots(model, batch["input_ids"], batch["pairs"])
            batch["captions"] = slots, [b.split(data.IMAGE_TOKEN)[0].strip() for b in bare]
        if "vae_pixels" in batch:
            gens = {e: torch.Generator().manual_seed(args.seed * 2**32 + e) for e, _ in dreamt}
            batch["draws"] = model.draw_noise([gens[e] for e, _ in dreamt])
        return batch

    def get_parts(i, scored):
        # micro-batch i of the run (this process's slice), as batches of like lengths: in a mixed
        # stage a document is ~10x a pair, and padding all to the longest wastes half the LLM's work.
        # scored: this step takes the score (its pictures are encoded and noised)
        es = range(i * args.batch_size + lo, i * args.batch_size + hi)
        examples = [example(e) for e in es]
        lengths = [len(model.encode_document(text, len(ims), layout, reply)[0])
                   for text, ims, layout, reply in examples]
        parts = [range(len(es))] if args.fsdp else by_length(lengths)  # FSDP: as many forwards
        return [collate([es[k] for k in part], [examples[k] for k in part], scored) for part in parts]

    bar = tqdm(total=args.steps, initial=step, desc=f"stage {args.stage}", unit="step",
               dynamic_ncols=True, disable=True if rank > 0 else None)  # None: no bar in a log file
    t0, first = time.perf_counter(), step
    with cli.StopSignals() as signals, bar:
        while step < args.steps:
            lr = lr_at(step, args)
            for group in opt.param_groups:
                group["lr"] = lr * group.get("lr_scale", 1.0)
            scored = step % every == 0  # the score on this step, weighted every
            w = scored_weights if scored else weights
            totals = torch.zeros(6, dtype=torch.float64, device=device)  # loss, 4 terms, stop
            for micro in range(args.grad_accum):
                parts = get_parts(step * args.grad_accum + micro, scored)
                # each part's share of the global micro-batch's labels, images and pairs
                shares = parallel.batch_shares(parts, world, device, model.config.lm_mean)
                for batch, share in zip(parts, shares):
                    loss, terms = step_loss(model, anchor, batch, share, w, device)
                    if loss.requires_grad:  # (a batch may hold nothing this stage learns from)
                        (loss / args.grad_accum).backward()
                    totals[:5] += torch.cat([loss[None], terms]).detach().double() / args.grad_accum
            totals[5] = float(signals.received)
            loss, lm, diffusion, aligned, anchored, stop = parallel.all_sum(totals, world).tolist()
            if not math.isfinite(loss):
                raise Stop(f"step {step + 1}: the loss is {loss}; stopped ({ckpt.kept()})")
            parallel.sync_grads(params, world)
            norm = parallel.clip_grads(params, 1.0, world) if args.fsdp else \
                torch.nn.utils.clip_grad_norm_(params, 1.0)
            if not torch.isfinite(norm):
                raise Stop(f"step {step + 1}: the gradient norm is {norm.item()}; stopped "
                           f"({ckpt.kept()})")
            opt.step()
            opt.zero_grad(set_to_none=True)
            if not scored:  # a step without the score shows (and logs) the last one taken
                diffusion = ckpt.losses.get("diffusion", 0.0)
            step += 1
            ckpt.losses = dict(loss=loss, lm=lm, diffusion=diffusion, align=aligned, anchor=anchored)
            shown = dict(lm=lm, diffusion=diffusion) | {k: ckpt.losses[k] for k in ("align", "anchor")
                                                        if weights[k] > 0}
            bar.update()
            bar.set_postfix(loss=f"{loss:.4f}", **{k[:5]: f"{v:.4f}" for k, v in shown.items()})
            if rank == 0 and (step % args.log_every == 0 or step == args.steps):
                rate = (step - first) / (time.perf_counter() - t0)
                tqdm.write(f"step {step}/{args.steps}  loss {loss:.4f}  " +
                           "  ".join(f"{k} {v:.4f}" for k, v in shown.items()) +
                           f"  lr {lr:.2e}  {rate:.2f} steps/s")
                log_metrics(out, dict(stage=args.stage, step=step, **ckpt.losses, lr=lr,
                                      grad_norm=norm.item(),  # before clipping to 1
                                      steps_per_s=rate, seconds=time.perf_counter() - t0))
            if step in (args.steps, args.stop_after) or step % args.save_every == 0 or stop:
                with signals.saving():
                    ckpt.save(step)
            if stop:
                raise Interrupted(f"interrupted: saved step {step} to {out}; go on with --resume")
            if step == args.stop_after:
                return say(f"stopped after step {step} (--stop-after), saved to {out}; go on with --resume")
    say(f"done: {step} steps, saved to {out}" + "".join(
        f"; {name} computed {m.computed:,} of {m.seen:,}" for name, m in memos.items() if m.seen))


# ---------------------------------------------------------------------------------- around the loop

def step_loss(model, anchor, batch, share, weights, device):
    # The loss of one batch, the paper's sum with the stage's weights (TERMS; loss_weights):
    #   L = w_lm CE + w_diffusion |eps - unet(z_t, t, c)|^2 + w_align align + w_anchor |c - c_0|^2
    # The toy's stage II: CE + 10 diffusion + 10 anchor. The LLM runs up to three times here: the
    # model over the batch (CE, and c at the dream slots; DreamLLM.forward), the frozen copy of the
    # stage's start over the batch's pairs (c_0, anchor_targets: toy II and III), and the model over
    # "" (the null that condition dropout puts in c's place, cond_dropout > 0; DreamLLM.diffusion_loss).
    # share: (labelled tokens, images, pairs) of this batch over those of the global micro-batch, so
    # that the terms summed over batches and processes are means over it (plumbing/parallel.py).
    # In the toy's I-creation the condition projector trains through a whitening of its input
    # (plumbing/whitening.py). -> (the weighted sum, a scalar; the four terms, (4,), each x share)
    pairs = batch.pop("pairs")  # the rows of pairs written: what the anchor holds
    held = batch.pop("held_ids", None)  # (len(pairs), T') what it holds them to
    with cli.autocast(device):
        if anchor is not None and pairs and {"vae_pixels", "captions"} & set(batch):
            batch["anchor"] = anchor_targets(anchor, batch["input_ids"], pairs, held)
        losses = model(**batch)
    zero = losses["diffusion"] * 0  # (a term the batch has none of)
    terms = torch.stack([losses["lm"] * share[0], losses["diffusion"] * share[1],
                         losses.get("align", zero) * share[2], losses.get("anchor", zero) * share[2]])
    return (terms * torch.tensor([weights[k] for k in TERMS], device=device)).sum(), terms


def pair_slots(model, input_ids, rows):
    # the dream slots of the batch's rows `rows`, as indices among all its dream slots: (m,)
    per_row = model.slot_masks(input_ids)[0].sum(1) // model.config.n_queries  # dream slots
    first = per_row.cumsum(0) - per_row
    return torch.cat([torch.arange(first[r], first[r] + per_row[r]) for r in rows])


@torch.no_grad()
def anchor_targets(anchor, input_ids, rows, held_ids=None):
    # The anchor: the model as the stage began. For the dream slots of `rows` (pairs written, what
    # stage I-creation aligned on): (their indices among the batch's dream slots, (m,), and the
    # anchor's condition for them, (m, K, C)), of the pairs themselves or of held_ids, their bare
    # captions (data.unframe). Documents and instructions are not held: a stage may teach them to
    # draw.
    held_ids = input_ids[rows] if held_ids is None else held_ids
    return pair_slots(anchor, input_ids, rows), anchor.slot_conditions(held_ids)


def by_length(lengths, saving=0.4):
    # [token count of each example] -> groups of their indices: all of them, or the shorter ones and
    # the longer ones where that cut pads fewer tokens by `saving` of the whole at least (a second,
    # smaller forward is not free)
    order = sorted(range(len(lengths)), key=lengths.__getitem__)
    L = [lengths[k] for k in order]
    padded = lambda cut: cut * L[cut - 1] + (len(L) - cut) * L[-1]  # tokens in the two batches
    cut = min(range(1, len(L)), key=padded, default=0)
    if not cut or padded(cut) > (1 - saving) * len(L) * L[-1]:
        return [range(len(lengths))]
    return [sorted(order[:cut]), sorted(order[cut:])]


def log_metrics(out, record):
    # one JSON line per logged step, appended to the run's metrics.jsonl (the curves to compare
    # with: shapes/report.py draws them); a resumed run appends after the lines of its first part
    with open(Path(out) / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def lr_at(step, args):  # linear warmup from 0, then cosine down to final_lr x the peak at --steps
    if step < args.warmup:
        return args.lr * step / args.warmup  # HF's: the first step has lr 0
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    final = recipe(args.preset)["final_lr"]
    return args.lr * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


TERMS = ("lm", "diffusion", "align", "anchor")  # the loss's terms, each with its weight


def dream_variants(args):  # the DreamConfig fields a run sets: its flags over the recipe's
    given = {k: getattr(args, k) for k in DREAM_FLAGS if getattr(args, k) is not None}
    return recipe(args.preset)["dream"] | given


def loss_weights(args, stage):
    # the stage's (as the preset's recipe has it), unless given as flags. The creation loss's
    # weight goes to the terms the objective has: w_diffusion (diffusion + align_weight * align)
    w = {k: stage.get(f"{k}_weight", 0.0) if getattr(args, f"{k}_weight") is None
         else getattr(args, f"{k}_weight") for k in ("lm", "diffusion", "anchor")}
    dream = dreamllm.DreamConfig(**dream_variants(args))
    creation = w["diffusion"]
    w["diffusion"] = 0.0 if dream.objective == "align" else creation
    w["align"] = 0.0 if dream.objective == "score" else creation * dream.align_weight
    return w


def example_source(args, stage):
    # e -> example e of the run, a pure function of (seed, e): resuming needs only the step
    if args.data == "shapes":
        mix = args.mix.split(",") if args.mix else cycle(stage["mix"])
        if unknown := [k for k in mix if k not in data.KINDS]:
            raise Stop(f"--mix: unknown kind {unknown[0]!r} (have {', '.join(data.KINDS)})")
        return lambda e: data.example(mix[e % len(mix)], args.seed, e)
    if not Path(args.data).is_file():
        raise Stop(f"--data {args.data}: no such file (give 'shapes' or a JSONL manifest of documents)")
    docs = list(data.read_documents(args.data))  # a manifest: read once, reshuffled each epoch
    if not docs:
        raise Stop(f"{args.data}: no documents")
    for n, (text, _) in enumerate(docs, 1):
        try:
            dreamllm.check_text(text)
        except ValueError as e:
            raise Stop(f"{args.data}: document {n}: {e}") from None

    @functools.lru_cache(maxsize=2)
    def order(epoch):
        o = list(range(len(docs)))
        random.Random(f"{args.seed}/{epoch}").shuffle(o)
        return o
    return lambda e: (*docs[order(e // len(docs))[e % len(docs)]], "document", "")


def open_run(args):
    # -> (the checkpoint to continue or None, the run's folder, the stage); refuses what loses work
    stage, out = stage_of(args), Path(args.out or f"out/{args.preset}-{args.stage}")
    if args.groups:  # what trains, given: e.g. the official I-creation's, the LLM frozen
        stage = stage | dict(groups=args.groups.split(","))
    args.given = {k: v for k, v in vars(args).items() if k not in ("given", "recipe")}  # saved;
    args.recipe = stage_recipe(args)  # both compared when a run is continued or skipped as done
    args.lr = stage["lr"] if args.lr is None else args.lr
    if args.warmup is None:  # the recipe's share of the steps, rounded up (HF's warmup_ratio)
        args.warmup = math.ceil(recipe(args.preset)["warmup_ratio"] * args.steps)
    if args.whiten is None:  # the preset's recipe decides
        args.whiten = recipe(args.preset)["whiten"]
    if out.exists() and not out.is_dir():
        raise Stop(f"--out {out} is a file, not a folder; pick another --out")
    if (out / "curriculum.json").is_file():
        raise Stop(f"--out {out} is a curriculum's folder: give one of its stages' folders, or "
                   "another --out")
    run = checkpoint.read_run(out)
    if args.resume and run is None:
        raise Stop(f"--resume: {out} holds no checkpoint to continue")
    if run is not None and not args.resume:
        raise Stop(f"{out} already holds a run (stage {run['stage']}, step {run['step']} of "
                   f"{run['steps']}): continue it with --resume, or pick another --out")
    for key in RUN_ARGS if run else ():
        if run["args"].get(key) != args.given[key]:
            was, now = ("(not given)" if v is None else v for v in (run["args"].get(key), args.given[key]))
            raise Stop(f"--resume: {out} is a run with --{key.replace('_', '-')} {was}, not {now}")
    if run and run.get("recipe", args.recipe) != args.recipe:  # the code changed the stage under it
        was, now = run["recipe"], args.recipe
        key = next(k for k in sorted(set(was) | set(now)) if was.get(k) != now.get(k))
        raise Stop(f"{out} was trained with stage {args.stage}'s {key} {was.get(key)}, and the recipe "
                   f"now says {now.get(key)}: pick another --out, or delete {out} to train it again")
    return run, out, stage


def stage_recipe(args):  # the stage as the recipe has it, as a run's config.json records it
    return json.loads(json.dumps(stage_of(args)))


def setup(args, stage, run, out, example, rank, world, device, weights):
    # the model with what earlier runs trained, the optimizer, the step to start at, the checkpointer
    if args.batch_size < world:
        raise Stop(f"--batch-size {args.batch_size} (the global batch) is under the {world} processes")
    if args.fsdp and "llm" not in stage["groups"]:
        raise Stop(f"--fsdp shards the LLM, which stage {args.stage} does not train (drop --fsdp)")
    model = cli.build_model(args.preset, seed=args.seed, **dream_variants(args)).to(device)
    groups = list(stage["groups"])
    if args.init:  # start from another run (e.g. stage II from stage I) and keep what it trained
        init = checkpoint.read_run(args.init)
        if init is None or init["preset"] != args.preset:
            raise Stop(f"--init: {args.init} holds no checkpoint of preset {args.preset}")
        model.load_trained_state(checkpoint.read_tensors(init, "model"))
        groups += [g for g in init["groups"] if g not in groups]
    anchor = None  # a frozen copy of the model as the stage begins, sharing the frozen backbones
    if weights["anchor"] > 0:
        anchor = copy.deepcopy(model, {id(m): m for m in (model.clip, model.unet, model.vae)})
        anchor.requires_grad_(False)
    train_state = checkpoint.read_tensors(run, "train_state") if run else {}
    if run:
        model.load_trained_state(checkpoint.read_tensors(run, "model"))
    model.llm.gradient_checkpointing = args.checkpointing
    units = parallel.shard_llm(model) if args.fsdp else []
    whitening = None
    if args.whiten and "condition_projector" in stage["groups"] and "llm" not in stage["groups"]:
        saved = {k.split(".", 1)[1]: train_state.pop(k) for k in list(train_state)
                 if k.startswith("whitening.")}
        whitening = Whitening(model, example, saved or None)
    params, opt = make_optimizer(model, stage["groups"], args, whitening)
    if device.type == "cuda":
        cli.cast_frozen(model, torch.bfloat16)
    if args.compile:  # in place (Module.compile), so parameter names and checkpoints stay the same
        for m in [*model.llm.model.layers, model.unet]:
            m.compile()
    if run:
        checkpoint.load_optimizer_tensors(opt, train_state, device)
    ckpt = checkpoint.Checkpointer(args, out, model, groups, opt, whitening, units, rank, run)
    n = sum(t.numel() for t in model.trained_state(stage["groups"]).values())
    if rank == 0:
        print(f"stage {args.stage}: training {', '.join(stage['groups'])} ({n:,} parameters) of preset "
              f"{args.preset} on {device}{f' x {world} processes' if world > 1 else ''}, steps "
              f"{run['step'] if run else 0}..{args.steps}, into {out}")
    return model, groups, params, opt, (run["step"] if run else 0), ckpt, anchor


def make_optimizer(model, groups, args, whitening=None):
    # Only the stage's groups train. AdamW; no weight decay on the dream queries, the new token
    # rows, biases and norms. New rows without the LLM: the gradient of the old rows is zeroed, so
    # (with no decay) Adam leaves them bit-identical.
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
            keep = (torch.arange(p.shape[0], device=p.device) >= model.n_text_vocab)[:, None]
            p.register_hook(lambda grad, keep=keep: grad * keep)
    slow = []
    if whitening:  # AdamW steps W' in W's place, the dream queries at lr * QUERY_LR (whitening.py)
        params, slow = whitening.optimizer_params(params)
    decay = [p for p in params if id(p) not in no_decay]
    rest = [p for p in params if id(p) in no_decay and all(p is not q for q in slow)]
    param_groups = [dict(params=decay, weight_decay=args.weight_decay),
                    dict(params=rest, weight_decay=0.0)]
    param_groups += [dict(params=slow, weight_decay=0.0, lr_scale=Whitening.QUERY_LR)] if slow else []
    opt = torch.optim.AdamW(param_groups, lr=args.lr, betas=recipe(args.preset)["betas"])
    if whitening:
        whitening.attach(opt)
    return params, opt


# ------------------------------------------------------------------------------------------ arguments

def parse_args(argv=None):
    p = cli.Parser(description="Train DreamLLM (a stage of it) and checkpoint it.", formatter_class=cli.Help)
    p.add_argument("--preset", default=DEFAULT_PRESET, choices=cli.PRESETS, help="the backbones")
    p.add_argument("--stage", default="all", choices=["all", *STAGES], help="what trains, with "
                   "which losses; all: the preset's curriculum (CURRICULA), each stage from the last")
    p.add_argument("--steps", type=int, help="the run's length: the lr schedule spans it (default: "
                   "the stage's in the preset's curriculum, else 3000)")
    p.add_argument("--stop-after", type=int, help="checkpoint and exit after this step, as an interruption would")
    p.add_argument("--batch-size", type=int, default=8, help="documents per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--groups", help="what trains, e.g. 'dream_queries,condition_projector' (the "
                   f"official I-creation's) (default: the stage's; groups: {', '.join(dreamllm.GROUPS)})")
    p.add_argument("--lr", type=float, help="peak learning rate (default: the stage's)")
    p.add_argument("--warmup", type=int, help="linear warmup steps (default: the recipe's warmup_ratio of --steps: the official 0.3%%, the toy's 1/30)")
    p.add_argument("--weight-decay", type=float, default=0.0, help="AdamW's, on weight matrices only")
    p.add_argument("--whiten", action=argparse.BooleanOptionalAction,
                   help="train the condition projector in whitened coordinates, a trick of ours "
                   "(plumbing/whitening.py; stages with the LLM frozen; default: the preset's recipe, off)")
    p.add_argument("--device", default="auto", help="auto: cuda (bf16 autocast), else mps, else cpu (fp32)")
    p.add_argument("--out", help="the run's folder (default: out/<preset>-<stage>; --stage all: "
                   "out/<preset>, a folder per stage)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out")
    p.add_argument("--init", help="start from the trained state of another run's folder (e.g. stage I's)")
    p.add_argument("--seed", type=int, default=0, help="the initialisation, the data order and the noise")
    p.add_argument("--data", default="shapes", help="'shapes' (the shapes world) or a JSONL manifest of "
                   "interleaved documents (see shapes/data.py), read into memory once")
    p.add_argument("--mix", help="the kinds of example to cycle over, e.g. 'i2t,vqa' (default: the "
                   f"stage's; kinds: {', '.join(data.KINDS)})")
    p.add_argument("--save-every", type=int, default=100, help="checkpoint every this many steps (and at the end)")
    p.add_argument("--log-every", type=int, default=10, help="print the losses every this many steps")
    speed = p.add_argument_group("speed and scale (under torchrun, --batch-size is the global batch)")
    speed.add_argument("--checkpointing", action="store_true", help="activation checkpointing of the LLM's blocks")
    speed.add_argument("--compile", action="store_true", help="torch.compile the LLM's blocks and the UNet")
    speed.add_argument("--fsdp", action="store_true", help="shard the LLM across the processes (FSDP2; stages "
                       "that train it), instead of a copy per process")
    loss = p.add_argument_group("loss variants (default: the stage's weights and the preset's DreamConfig)")
    loss.add_argument("--target", choices=["epsilon", "v", "x0"], help="the space of the diffusion MSE")
    loss.add_argument("--min-snr-gamma", type=float, help="min-SNR-gamma weighting, e.g. 5")
    loss.add_argument("--cond-dropout", type=float, help="P(condition -> null condition), trains CFG")
    loss.add_argument("--dropout-null", choices=["patches", "queries"], help="that null: the LLM "
                      "over raw <im_patch> (official) or over the queries after an empty prompt")
    loss.add_argument("--diffusion-weight", type=float, help="lambda on the diffusion loss")
    loss.add_argument("--score-every", type=int, help="the diffusion loss on every k-th step only, "
                      "weighted k; the other terms on each (default: the stage's where the "
                      "alignment trains beside the score, toy I-creation, II, III: 2; else 1)")
    loss.add_argument("--lm-weight", type=float, help="weight of the LM cross-entropy")
    loss.add_argument("--anchor-weight", type=float, help="weight of the anchor: the MSE of each "
                      "pair written's condition to the one the stage began with (ours; toy II, III: 10)")
    loss.add_argument("--lm-mean", choices=dreamllm.LM_MEANS, help="the LM loss: the mean "
                      "over labelled tokens (official) or of each example's mean")
    loss.add_argument("--objective", choices=dreamllm.OBJECTIVES, help="the creation loss: score "
                      "distillation through the UNet (DreamLLM's), align: regression onto the text "
                      "encoder's states of the caption (GILL's; needs --bridge mapper), or both "
                      "(default: the preset's recipe: score, both for toy)")
    loss.add_argument("--align-weight", type=float, help="the alignment's weight beside the "
                      "diffusion loss's (--objective both; default 1)")
    loss.add_argument("--align-distance", choices=alignment.DISTANCES, help="the alignment's "
                      "distance (default mse)")
    loss.add_argument("--bridge", choices=dreamllm.BRIDGES, help="what the UNet reads: the K "
                      "projected states, or GILL's mapper of them to the text encoder's L "
                      "(structural; default: the preset's recipe: projector, mapper for toy)")
    loss.add_argument("--n-queries", type=int, help="K, the dream queries per image (structural: "
                      "the DreamConfig's n_queries; default: the preset's, 8 for toy)")
    args = p.parse_args(argv)
    for name in ("steps", "batch_size", "grad_accum", "save_every", "log_every", "stop_after",
                 "n_queries", "score_every"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.groups is not None and (bad := [g for g in args.groups.split(",") if g not in dreamllm.GROUPS]):
        p.error(f"--groups: unknown group {bad[0]!r} (have {', '.join(dreamllm.GROUPS)})")
    checks = [("lr", lambda v: 0 < v <= 1, "a learning rate in (0, 1]"),
              ("warmup", lambda v: v >= 0, ">= 0"),
              ("weight_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
              ("cond_dropout", lambda v: 0 <= v < 1, "a probability in [0, 1)"),
              ("min_snr_gamma", lambda v: v > 0, "> 0"),
              ("diffusion_weight", lambda v: v >= 0, ">= 0"),
              ("lm_weight", lambda v: v >= 0, ">= 0"),
              ("anchor_weight", lambda v: v >= 0, ">= 0"),
              ("align_weight", lambda v: v >= 0, ">= 0")]
    for name, ok, what in checks:
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and ok(v)):
            p.error(f"--{name.replace('_', '-')} {v}: must be {what}")
    dream = dreamllm.DreamConfig(**dream_variants(args))  # the flags over the preset's recipe
    if dream.objective != "score" and dream.bridge != "mapper":
        p.error(f"objective {dream.objective} compares the condition with the text encoder's "
                "states, L of them: give --bridge mapper (or --objective score)")
    if args.stage != "all" and args.steps is None:
        args.steps = dict(CURRICULA.get(args.preset, [])).get(args.stage, 3000)
    return args


def main(argv=None):
    args = parse_args(argv)
    cli.main(lambda: curriculum(args) if args.stage == "all" else train(args), "train.py")


if __name__ == "__main__":
    main()
