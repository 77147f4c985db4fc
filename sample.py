"""Samples a trained DreamLLM (a train.py run's folder): text -> images, interleaved documents,
image -> text, and the shapes world's evaluation.

    python sample.py --prompt "a red circle" --num-images 4 --seed 0     # PNGs + grid.png in out/samples
    python sample.py --document "Here is a blue square. <image>"   # document.html, document.json
    python sample.py --image out/samples/a_red_circle_0.png --question "What colour is the circle?"
    python sample.py --image out/samples/a_red_circle_0.png --prompt "<image> the same, in blue"
    python sample.py --eval                  # the benchmark (shapes/benchmark.py): eval.html, eval.json

The released DreamLLM-7B (python -m weights.download dreamllm-7b-chat sd-2.1-base; 8.0B parameters,
16 GB of GPU memory in bf16), with its official prompt format and the official scripts' sampling
(weights/official.py: DDPM, 150 steps; answers by 5 beams), and plain SD 2.1-base beside it with its
own text encoder, the paper's baseline:

    python sample.py --model dreamllm-7b --prompt "a red bicycle against a brick wall" --baseline-sd
    python sample.py --model dreamllm-7b --image photo.jpg --question "What is unusual here?" --max-new-tokens 128
    python sample.py --model dreamllm-7b --document "Write a short recipe for pancakes, with pictures."

--eval runs the shapes world's benchmark (shapes/benchmark.py) on colour-shape combinations no
training document showed: drawing them, answering and captioning them, writing documents about them,
all judged by judge.analyse_scene and judge.parse_caption, the toy world's FID table. --untrained
evaluates the preset as built (dream queries at init), the baseline that shows what training did.
"""
import contextlib
import json
import math
import re
from pathlib import Path

import torch
from PIL import Image, ImageDraw

import clip
from plumbing import alignment, checkpoint, cli
from plumbing.cli import Stop
from shapes import benchmark, data, pages, report
from weights import official

DEFAULT_PRESET = "toy"  # train.py's: what `python sample.py` samples (out/toy)


DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def load(args, device, dtype):
    # -> (model, its run's config or None): the checkpoint's preset, built, with its trained state loaded;
    # or the released model (--model: a preset such as dreamllm-7b, or its folder)
    if args.model:
        folder = official.PRESETS.get(args.model, args.model)
        return official.load_official(folder, device, dtype), None
    if args.untrained:
        return cli.build_model(args.preset or DEFAULT_PRESET, seed=args.seed), None
    root = Path(args.ckpt or f"out/{args.preset or DEFAULT_PRESET}")
    ckpt, run = checkpoint.read_final(root)  # a curriculum's folder: its last stage trained
    if run is None:
        raise Stop(f"{root}: no checkpoint there (no step-N/ folder, no stage of a curriculum); "
                   "train one with train.py")
    if args.preset and run["preset"] != args.preset:
        raise Stop(f"{ckpt} holds a checkpoint of preset {run['preset']}, not {args.preset}")
    if Path(args.out).resolve() == ckpt.resolve():
        raise Stop(f"--out {args.out} is the checkpoint's folder; write samples somewhere else")
    model = cli.build_model(run["preset"], seed=run["seed"], **run["dream_config"])
    model.load_trained_state(checkpoint.read_tensors(run, "model"))
    return model, run


def grid(rows, scale=2, pad=4, label_h=16):
    # [(label, [PIL images])] -> one image: each row's label above its images, scaled up (nearest)
    S = rows[0][1][0].width * scale
    width = max(pad + max(len(ims) for _, ims in rows) * (S + pad),
                max(int(ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(label)) for label, _ in rows) + 2 * pad)
    canvas = Image.new("RGB", (width, pad + len(rows) * (label_h + S + pad)), "white")
    pen = ImageDraw.Draw(canvas)
    for r, (label, images) in enumerate(rows):
        y = pad + r * (label_h + S + pad)
        pen.text((pad, y + 2), label, fill="black")
        for c, im in enumerate(images):
            canvas.paste(im.resize((S, S), Image.NEAREST), (pad + c * (S + pad), y + label_h))
    return canvas


def slug(text):  # "a red circle" -> "a_red_circle", for file names
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:40] or "image"


def write_document(prompt, segments, out):
    # document.html, the images as PNGs beside it; and document.json, the same for programs:
    # {"prompt": ..., "segments": [{"text": ...}, {"image": "document_1.png"}]}, the whole document
    # in order, the prompt its first text segment
    listed = [dict(text=prompt)]
    for segment in segments:
        if isinstance(segment, str):
            listed.append(dict(text=segment))
        else:
            listed.append(dict(image=f"document_{sum('image' in s for s in listed) + 1}.png"))
            segment.save(out / listed[-1]["image"])
    page = pages.page("DreamLLM document", [pages.document(listed, width=192)])
    (out / "document.html").write_text(page, encoding="utf-8")
    document = dict(prompt=prompt, segments=listed)
    (out / "document.json").write_text(json.dumps(document, indent=1, ensure_ascii=False) + "\n",
                                       encoding="utf-8")
    return sum("image" in s for s in listed)


def evaluate(model, run, args, sampling, out):
    # the shapes world's benchmark, its sizes the defaults but for the two that sample.py sets
    sizes = benchmark.Sizes(images=args.eval_images, questions=args.eval_questions)
    meta = dict(model=f"{args.preset or DEFAULT_PRESET}, untrained" if run is None else
                str(run["path"]))  # the checkpoint's step-N folder
    sampling = {k: v for k, v in sampling.items() if k != "generator"}  # it seeds its own
    benchmark.benchmark(model, out, args.seed, sampling, sizes, beams=args.beams, meta=meta,
                        split=args.split)
    if run is not None:  # the page to look at: the training's curves beside the benchmark's
        folder = args.ckpt or Path("out") / run["preset"]
        print(f"wrote {report.write(folder, out, out / 'report.html')}")
        if args.split == "eval" and (line := report.summary(folder, out)):  # like ours? (docs/reference/<preset>/)
            print(line)


TOY_SAMPLING = dict(benchmark.SAMPLING, prefix="")  # DDIM 30 steps, guidance 2: measured best


def main(argv=None):
    p = cli.Parser(description="Sample a trained DreamLLM: images, documents, answers; --eval "
                   "benchmarks it.", formatter_class=cli.Help)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--prompt", help="text -> --num-images images (PNGs and a labelled grid.png); "
                      "with --image, image + text -> image (the image read first)")
    what.add_argument("--document", help="continue this text into an interleaved document "
                      "(document.html); a final <image> asks for an image there")
    what.add_argument("--question", help="a question about --image, answered")
    what.add_argument("--eval", action="store_true", help="the shapes world's benchmark "
                      "(shapes/benchmark.py): eval.json, eval.html")
    p.add_argument("--image", help="the image --question asks about, or that --prompt draws from")
    p.add_argument("--model", help="the released DreamLLM: a preset (dreamllm-7b, "
                   "dreamllm-7b-aesthetic) or its folder; instead of --ckpt")
    p.add_argument("--dtype", choices=list(DTYPES), help="--model's weights (default: as the official "
                   "scripts, fp32 to draw and write documents, bf16 on CUDA to answer)")
    p.add_argument("--baseline-sd", action="store_true", help="--prompt: also plain Stable Diffusion "
                   "with its own text encoder (the paper's baseline), side by side in grid.png")
    p.add_argument("--sd", default="weights/sd-2.1-base", help="--baseline-sd's diffusers folder")
    p.add_argument("--ckpt", help=f"a train.py run's folder (default: out/<preset>, preset "
                   f"{DEFAULT_PRESET})")
    p.add_argument("--preset", help="the preset the checkpoint must be of (default: whatever it is)")
    p.add_argument("--untrained", action="store_true", help="no checkpoint: the preset as built "
                   "(a baseline)")
    p.add_argument("--out", default="out/samples", help="folder for the PNGs, document.html, "
                   "eval.json")
    p.add_argument("--num-images", type=int, help="images for --prompt (default: 4)")
    p.add_argument("--best-of", type=int, help="--prompt: draw this many, one per seed (--seed, "
                   "--seed + 1, ...), rank them by a CLIP's image-text score, keep all (best_of.json) "
                   "and mark the best; the paper's COCO protocol: --model dreamllm-7b --best-of 8 --seed 42")
    p.add_argument("--scorer", help="--best-of's CLIP: a folder (default: weights/clip-vit-large-patch14 "
                   "for --model, as the paper; the toy model's own CLIP for a checkpoint)")
    p.add_argument("--vqa-protocol", choices=list(official.PROTOCOLS), help="--model --question: as "
                   "the official eval_vqa.sh asks that benchmark (its prompts, beams, answer cut; "
                   "the caption benchmarks ask no question: give --question ''); docs/release.md")
    p.add_argument("--seed", type=int, default=0, help="the noise (and the text, if --temperature > 0)")
    how = p.add_argument_group("sampling (default: the official scripts' for --model, "
                               "weights/official.py's SAMPLING; for the toy, DDIM 30 steps at "
                               "guidance 2)")
    how.add_argument("--sampler", choices=["ddim", "ddpm"], help="the denoising sampler")
    how.add_argument("--steps", type=int, help="denoising steps")
    how.add_argument("--guidance", type=float, help="classifier-free guidance scale (1: none)")
    how.add_argument("--negative", help="the negative prompt: CFG's null condition ('' for none)")
    how.add_argument("--prefix", help="put before every prompt (the aesthetic model's demo: a "
                     "quality prefix; '' for none)")
    how.add_argument("--beams", type=int, help="--question: beam search with this many beams (1: "
                     "greedy or sampled; default: 5 for --model, as the official VQA runs, else 1)")
    how.add_argument("--max-new-tokens", type=int, help="text tokens to write (default: 1024 for "
                     "--model's answers, as the official VQA; else 32)")
    how.add_argument("--temperature", type=float, help="0: greedy (the default)")
    sizes = benchmark.Sizes()  # --eval's other sizes: python -m shapes.benchmark -h
    p.add_argument("--eval-images", type=int, default=sizes.images, help="--eval: images per "
                   "held-out single-shape prompt")
    p.add_argument("--eval-questions", type=int, default=sizes.questions, help="--eval: VQA "
                   "questions")
    p.add_argument("--split", choices=list(data.SPLITS), default="eval", help="--eval's held-out "
                   "pairs: eval (data.HELD_OUT, the rows we report) or val (data.VALIDATION, where "
                   "recipes are chosen)")
    p.add_argument("--device", default="auto", help="auto: cuda (bf16 autocast), else mps, else cpu")
    args = p.parse_args(argv)
    if args.question is not None and not args.image:
        p.error("--question needs --image, the image it asks about")
    if args.image and args.question is None and args.prompt is None:
        p.error("--image goes with --question (answer) or --prompt (image + text -> image)")
    if args.baseline_sd and (args.prompt is None or args.image):
        p.error("--baseline-sd goes with --prompt alone")
    if args.model and (args.eval or args.ckpt or args.untrained):
        p.error("--model is the released model: not with --eval (the toy world's), --ckpt or "
                "--untrained")
    defaults = official.SAMPLING.get(args.model, official.SAMPLING["dreamllm-7b"]) if args.model \
        else TOY_SAMPLING
    for key, value in defaults.items():
        setattr(args, key, value if getattr(args, key) is None else getattr(args, key))
    if args.vqa_protocol and not (args.model and args.question is not None):
        p.error("--vqa-protocol goes with --model and --question (the release's benchmarks)")
    if args.vqa_protocol and (args.beams or args.temperature):
        p.error("--vqa-protocol decodes as the benchmark's script does: not with --beams or "
                "--temperature")
    if args.best_of is not None and (args.prompt is None or args.image or args.baseline_sd
                                     or args.num_images is not None):
        p.error("--best-of goes with --prompt alone (text -> image; it draws --best-of images)")
    if args.scorer and args.best_of is None:
        p.error("--scorer goes with --best-of")
    args.beams = args.beams or (official.BEAMS if args.model else 1)
    if args.max_new_tokens is None:
        args.max_new_tokens = official.MAX_NEW_TOKENS if args.model and args.question is not None else 32
    args.num_images = 4 if args.num_images is None else args.num_images
    for name in ("num_images", "steps", "eval_images", "eval_questions", "max_new_tokens", "beams",
                 "best_of"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if not (math.isfinite(args.guidance) and args.guidance >= 0):
        p.error(f"--guidance {args.guidance}: must be a number >= 0 (1: no guidance)")
    args.temperature = args.temperature or 0.0
    if not (math.isfinite(args.temperature) and args.temperature >= 0):
        p.error(f"--temperature {args.temperature}: must be a number >= 0 (0: greedy)")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        p.error(f"--out {args.out} is a file, not a folder")
    cli.main(lambda: sample(args), "sample.py")


def weights_dtype(args, device):
    # the release as its scripts run it: fp32 to draw (150 DDPM steps drift in bf16), bf16 on CUDA
    # to answer (omni/eval/vqa/vqa_inference.py:293); --dtype overrides either
    answering = args.question is not None and device.type == "cuda"
    return DTYPES[args.dtype or ("bf16" if answering else "fp32")]


def sample(args):
    image = data.open_image(args.image) if args.image else None  # a bad path fails before loading
    device = cli.pick_device(args.device)
    dtype = weights_dtype(args, device)
    # the baseline first: a missing SD folder fails before the 13.5 GB are read
    sd = official.StableDiffusion(args.sd, device, dtype) if args.baseline_sd else None
    model, run = load(args, device, dtype)
    model = model.to(device).eval()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(args.seed)  # on the CPU: the same images on any device
    sampling = dict(steps=args.steps, guidance=args.guidance, sampler=args.sampler, generator=g,
                    negative=args.negative)
    # the released model's weights are already in --dtype; the toy checkpoints run under bf16
    # autocast on CUDA
    with torch.no_grad(), contextlib.nullcontext() if args.model else cli.autocast(device):
        if args.prompt is not None:
            draw(model, sd, image, args, sampling, out)
        elif args.document is not None:
            # a text ending in <image> asks for an image there first (the rest is the model's)
            text = args.document.rstrip()
            force = text.endswith(data.IMAGE_TOKEN)
            text = text.removesuffix(data.IMAGE_TOKEN) if force else args.document
            segments = model.generate(model.prompts.chat(text), max_new_tokens=args.max_new_tokens,
                                      temperature=args.temperature, force_image=force, **sampling)
            n = write_document(text, segments, out)
            print(f"wrote {out / 'document.html'} with {n} image(s)")
        elif args.question is not None and args.vqa_protocol:
            print(official.ask(model, image, args.question, args.vqa_protocol, args.max_new_tokens, g)[0])
        elif args.question is not None:
            print(model.answer(image, args.question, beams=args.beams, generator=g,
                               max_new_tokens=args.max_new_tokens, temperature=args.temperature))
        else:
            evaluate(model, run, args, sampling, out)


def draw(model, sd, image, args, sampling, out):
    # --prompt: images, and the plain-SD baseline beside them; with --image, image + text -> image
    prompt = args.prefix + args.prompt
    if image is not None and data.IMAGE_TOKEN not in prompt:
        prompt = f"{data.IMAGE_TOKEN} {prompt}"  # the picture read first, then the dream slot
    if args.best_of is not None:
        return best_of(model, prompt, args, sampling, out)
    images = model.text_to_image(prompt, args.num_images, images=[image] if image else [],
                                 **sampling)
    for i, im in enumerate(images):
        im.save(out / f"{slug(args.prompt)}_{i}.png")
    rows = [(args.prompt, images)]
    if sd is not None:  # the same prompt and seeds through plain SD
        sampling = dict(sampling, generator=torch.Generator().manual_seed(args.seed))
        baseline = sd.text_to_image(prompt, args.num_images, image_size=model.config.image_size,
                                    **sampling)
        for i, im in enumerate(baseline):
            im.save(out / f"sd_{slug(args.prompt)}_{i}.png")
        rows = [("DreamLLM: " + args.prompt, images), ("plain SD: " + args.prompt, baseline)]
    grid(rows, scale=2 if images[0].width <= 128 else 1).save(out / "grid.png")
    print(f"wrote {len(images) * len(rows)} images and grid.png to {out}")


def best_of(model, prompt, args, sampling, out):
    # --best-of N: image i drawn from seed --seed + i (the official run per seed), each scored by
    # CLIP's logits_per_image (100 x cosine) against the prompt as written, without --prefix
    images = [model.text_to_image(prompt, 1, **dict(sampling, generator=torch.Generator().manual_seed(
        args.seed + i)))[0] for i in range(args.best_of)]
    scores = clip_scorer(model, args.scorer if args.scorer or not args.model else official.BEST_OF["scorer"])(
        images, args.prompt).tolist()
    best = max(range(len(images)), key=scores.__getitem__)
    ranked = []
    for i, (im, score) in enumerate(zip(images, scores)):
        im.save(out / f"{slug(args.prompt)}_{i}.png")
        ranked.append(dict(file=f"{slug(args.prompt)}_{i}.png", seed=args.seed + i, clip_score=score,
                           best=i == best))
    images[best].save(out / f"{slug(args.prompt)}_best.png")
    (out / "best_of.json").write_text(json.dumps(dict(prompt=args.prompt, images=ranked), indent=1))
    label = " | ".join(f"{r['seed']}: {r['clip_score']:.1f}{' best' if r['best'] else ''}" for r in ranked)
    grid([(f"{args.prompt} (seed: CLIP score) {label}", images)],
         scale=2 if images[0].width <= 128 else 1).save(out / "grid.png")
    print(f"wrote {len(images)} images, the best (seed {args.seed + best}, CLIP score {scores[best]:.2f}) "
          f"as {slug(args.prompt)}_best.png, best_of.json and grid.png to {out}")


def clip_scorer(model, folder=None):
    # -> score(images, text) -> (n,) CLIP logits: a full CLIP's from `folder` (vision and text
    # towers, vocab.json + merges.txt), or the toy model's own CLIP, whose text tower it carries
    if folder is None:
        clip_model, size = model.clip, model.clip.config.vision.image_size
        if getattr(clip_model, "text_model", None) is None:
            raise Stop("--best-of: this model's CLIP has no text tower; give a full CLIP with --scorer")
        encode = lambda texts: alignment.text_ids(model.tokenizer, texts, clip_model.config.text.n_positions)  # noqa: E731
    else:
        official._missing(folder, ["config.json", "vocab.json", "merges.txt"],
                          "python -m weights.download clip-vit-large-patch14")
        clip_model = clip.load(folder).eval()
        size = clip_model.config.vision.image_size
        encode = official.clip_tokenizer(folder)

    clip_model = clip_model.to(model.device)
    dtype = next(clip_model.parameters()).dtype

    @torch.no_grad()
    def score(images, text):
        pixels = torch.stack([clip.preprocess(im, size) for im in images]).to(model.device, dtype)
        return clip_model(pixels, encode([text]).to(model.device))[:, 0].float().cpu()
    return score


if __name__ == "__main__":
    main()
