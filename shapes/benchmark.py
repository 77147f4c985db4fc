"""The shapes world's benchmark: does a DreamLLM draw what it is asked, read what it is shown, and
write documents whose text is true of the pictures it drew? Judged without a model, by the shapes
world's analyser (judge.analyse_scene) and caption parser (judge.parse_caption), on colour-shape
combinations that training never showed (data.HELD_OUT, split "eval"; --split val: data.VALIDATION's,
where recipes are chosen).

    python -m shapes.benchmark --ckpt out/toy --out out/eval       # a train.py run: about a minute
    python -m shapes.benchmark --untrained                         # the toy preset as built: the baseline
    python -m shapes.benchmark --text-encoder                      # the toy SD from its own text states
    python -m shapes.benchmark --fit-condition 400 --two-shapes 8  # ... from conditions fitted per prompt
    python -m shapes.benchmark --quick                             # a few of each, to see it run
    python sample.py --eval                                        # the same, from sample.py

One table, each row a proportion with its N and 95% Wilson interval:
  create     held-out single shapes ("a blue triangle"): colour, shape, both right; two shapes with
             their colours bound and placed ("a red circle on the left and a blue square on the
             right"); the number of shapes drawn
  VQA        exact answers about held-out pictures, by kind of question (colour, shape, count,
             where, size) and all; and all on fresh pictures of training's own combinations, the
             control: a model that reads both alike does not read well, one that reads those better
             does not carry its reading over to pairs it never saw
  caption    held-out pictures captioned: every shape named truly, every size and position true
  document   an opening line ("Here is a green circle."), continued with the picture first: the
             picture right; text after a picture that says something of it; how much of that is
             true of the picture just drawn; documents the model ended itself
Written to --out: eval.json (rows and every item), eval.html (the table, the grids, the
documents), eval_grid.png and eval_two_shapes.png (the pictures, what the analyser saw under each).
"""
import html
import json
import math
import random
import re
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import torch
from PIL import Image, ImageDraw
from tqdm import tqdm

import diffusion
import unet
from plumbing import checkpoint, cli
from shapes import data, judge, pages

# The toy's sampling, measured best for the toy SD: guidance 2 (weights/train_toy.py); DDIM's 30
# steps draw as its 50 do. sample.py's defaults for the toy too.
SAMPLING = dict(sampler="ddim", steps=30, guidance=2.0, negative="")


def size(default, help):  # a field of Sizes, its -h line beside it
    return field(default=default, metadata=dict(help=help))


@dataclass
class Sizes:
    # how many of each; with the defaults the untrained toy preset takes 56 s on one thread of a
    # 2-core CPU (images 0.3 s each in batches of 16; answers and captions ~20 ms; documents
    # 0.5-2 s, by how many pictures they draw)
    images: int = size(16, "images per held-out single-shape prompt (4 prompts)")
    two_shapes: int = size(32, "two-shape prompts")
    two_shape_images: int = size(2, "images per two-shape prompt")
    questions: int = size(200, "VQA questions")
    captions: int = size(40, "pictures captioned")
    documents: int = size(24, "documents written")
    # text budgets, in tokens: the toy tokenizer writes an answer in 1-3, a caption in at most 15,
    # a whole training document in at most 87 (99% in under 75)
    answer_tokens: int = size(8, "an answer's budget (tokens)")
    caption_tokens: int = size(24, "a caption's budget")
    document_tokens: int = size(96, "a document's budget (each picture counts one)")


QUICK = Sizes(images=2, two_shapes=2, two_shape_images=1, questions=10, captions=4, documents=2)
BATCH = 16  # images drawn at once (one batch: 0.3 s an image on the CPU, 0.55 s alone)
DOCUMENT_IMAGES = 3  # the most pictures a document may draw, as training's documents (1-3)


def wilson(k, n, z=1.96):
    # The Wilson score interval of a proportion (Wilson 1927): the p for which k/n passes the
    # normal test |k/n - p| <= z sqrt(p (1 - p) / n), solved for p. Unlike k/n +- z sqrt(...),
    # it stays inside [0, 1] and is not of zero width at 0/n or n/n. z = 1.96: 95%.
    if n == 0:
        return 0.0, 1.0
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z / (1 + z2 / n) * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def generator(seed, part):
    # the noise of one part of the benchmark (each its own, so no two share their first images),
    # on the CPU: the same images on any device
    return torch.Generator().manual_seed(1000 * seed + part)


def row(name, rights):
    # a list of bools -> a row of the table: the proportion right, its N and interval
    n, k = len(rights), sum(rights)
    low, high = wilson(k, n)
    return dict(name=name, n=n, value=k / n if n else None, low=low, high=high)


def said(shape):  # a Found (or Shape) -> "large red circle on the left"
    return f"{shape.size} {shape.color} {shape.shape} {shape.position}"


def true_of(claim, shape):  # a parse_caption claim, e.g. {"color": "red", "shape": "square"}
    return all(getattr(shape, k) == v for k, v in claim.items())


def largest(found):  # analyse_scene's largest shape, or None: a single-shape prompt's judge
    return max(found, key=lambda f: f.pixels, default=None)


def draw_all(model, prompts, k, sampling, g, desc, condition=None):
    # k images per prompt, in batches of BATCH across prompts -> [[PIL image] * k] per prompt.
    # condition: prompt -> (1, K, C), the LLM's (model.condition) unless given; CFG's null is
    # its condition of the negative prompt
    condition = condition or model.condition
    context = torch.cat([condition(p).expand(k, -1, -1) for p in prompts])  # (n k, K, C)
    null = condition(sampling["negative"])
    images = []
    for i in tqdm(range(0, len(context), BATCH), desc=desc, unit="batch", disable=None):
        images += model.sample_images(context[i:i + BATCH], generator=g, progress=False,
                                      null=null, **sampling)
    return [images[i:i + k] for i in range(0, len(images), k)]


# ------------------------------------------------------------------------------------- creation

def two_shape_scenes(sizes, seed, split="eval"):  # the two-shape prompts' scenes, held-out pairs
    return [data.random_scene(random.Random(f"{seed}/benchmark/two/{i}"), split, n_shapes=2)
            for i in range(sizes.two_shapes)]


def create(model, sizes, sampling, seed, condition=None, split="eval"):
    # -> rows, details, grids: held-out single shapes, two shapes bound and placed, counts
    # (condition: as draw_all's)
    singles = data.eval_prompts(split)  # [(prompt, colour, shape)]
    scenes = two_shape_scenes(sizes, seed, split)
    twos = [data.caption(s, form="no size") for s in scenes]  # "a red circle on the left and ..."
    drawn = draw_all(model, [p for p, _, _ in singles], sizes.images, sampling, generator(seed, 0),
                     "create: single shapes", condition)
    drawn_two = draw_all(model, twos, sizes.two_shape_images, sampling, generator(seed, 1),
                         "create: two shapes", condition)
    single, counts = [], []
    for (prompt, colour, shape), images in zip(singles, drawn):
        for im in images:
            found = judge.analyse_scene(im)
            big = largest(found)
            single.append(dict(prompt=prompt, seen=[said(f) for f in found],
                               colour=big is not None and big.color == colour,
                               shape=big is not None and big.shape == shape))
            counts.append(len(found) == 1)
    two = []
    for prompt, scene, images in zip(twos, scenes, drawn_two):
        asked = sorted((s.color, s.shape, s.position) for s in scene.shapes)
        for im in images:
            found = judge.analyse_scene(im)
            two.append(dict(prompt=prompt, seen=[said(f) for f in found],
                            right=sorted((f.color, f.shape, f.position) for f in found) == asked))
            counts.append(len(found) == 2)
    rows = [row("create: held-out shape, colour", [d["colour"] for d in single]),
            row("create: held-out shape, shape", [d["shape"] for d in single]),
            row("create: held-out shape, both", [d["colour"] and d["shape"] for d in single]),
            row("create: two shapes bound and placed", [d["right"] for d in two]),
            row("create: number of shapes", counts)]
    grids = {"eval_grid.png": [(p, images, [d["seen"] for d in single[i * sizes.images:]])
                               for i, ((p, _, _), images) in enumerate(zip(singles, drawn))],
             "eval_two_shapes.png": [(p, images, [d["seen"] for d in two[i * len(images):]])
                                     for i, (p, images) in enumerate(zip(twos, drawn_two))]}
    return rows, dict(single=single, two_shapes=two), grids


def drawings(shapes, n, rng, size):
    # [(colour, shape, position or None)] -> (n, 3, size, size) in [-1, 1]: n pictures of what a
    # prompt asks, sizes and jitter drawn anew, and the place where the prompt names none
    jitter = lambda: rng.randint(-data.JITTER, data.JITTER)
    return torch.stack([unet.preprocess(data.draw(data.Scene(tuple(
        data.Shape(c, s, rng.choice(list(data.SIZES)), p or rng.choice(list(data.POSITIONS)),
                   jitter(), jitter()) for c, s, p in shapes))), size) for _ in range(n)])


def fitted_conditions(model, sizes, seed, steps, batch=16, lr=0.02, split="eval"):
    # -> prompt -> (1, L, C). No LLM: each creation prompt's condition fitted directly, by the
    # frozen UNet's denoising loss on 128 drawings of what the prompt asks (sizes and jitter drawn
    # anew; a lone shape's place too), starting from E(prompt). What the frozen UNet can be made
    # to draw at all: a bound on any condition DreamLLM's queries could learn (up to this search)
    asked = [(p, [(c, s, None)]) for p, c, s in data.eval_prompts(split)]
    asked += [(data.caption(sc, form="no size"), [(s.color, s.shape, s.position) for s in sc.shapes])
              for sc in two_shape_scenes(sizes, seed, split)]
    fitted, g = {}, torch.Generator().manual_seed(seed)
    with torch.enable_grad(), tqdm(asked, desc="fit conditions", unit="prompt", disable=None) as bar:
        for prompt, shapes in bar:
            if prompt in fitted:
                continue
            pixels = drawings(shapes, 128, random.Random(prompt), model.config.image_size)
            with torch.no_grad():  # the frozen VAE's posterior of each, once
                mean, logvar = model.vae.encode(pixels.to(model.device))
            std, z = (0.5 * logvar).exp(), model.vae.scaling_factor
            context = model.text_states([prompt]).detach().clone().requires_grad_(True)
            opt = torch.optim.Adam([context], lr=lr)
            for _ in range(steps):
                i = torch.randint(len(mean), (batch,), generator=g).to(model.device)
                z0 = z * (mean[i] + std[i] * torch.randn(mean[i].shape, generator=g).to(model.device))
                t = torch.randint(model.noise_scheduler.num_train_timesteps, (batch,), generator=g)
                loss = diffusion.denoising_loss(model.unet, model.noise_scheduler, z0,
                                                torch.randn(z0.shape, generator=g).to(model.device),
                                                t.to(model.device), context.expand(batch, -1, -1))
                opt.zero_grad()
                loss.backward()
                opt.step()
            fitted[prompt] = context.detach()
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return lambda p: fitted[p] if p in fitted else model.text_states([p])  # the null: E("")


# -------------------------------------------------------------------------------- comprehension

KINDS = {"colour": data.COLORS, "shape": data.SHAPES, "count": data.NUMBERS.values(),
         "where": data.POSITIONS, "size": data.SIZES}  # a question's kind, from its answer


def vqa(model, sizes, seed, beams, split="eval"):
    # exact match: the reply, less a final period, is the answer ("blue", "two", "on the left").
    # split "train": fresh pictures of training's own combinations, the control that tells reading
    # badly from not carrying reading over to held-out pairs. Fresh: training draws example i of
    # seed s from "s/train/question/i" (data._rng), and "benchmark/s" is no seed train.py takes.
    items = []
    for i in tqdm(range(sizes.questions), desc=f"VQA ({split})", unit="question", disable=None):
        scene, question, answer = data.question_example(
            f"benchmark/{seed}" if split == "train" else seed, i, split)
        reply = model.answer(data.draw(scene), question, beams=beams,
                             max_new_tokens=sizes.answer_tokens, progress=False)
        kind = next(k for k, words in KINDS.items() if answer in words)
        items.append(dict(question=question, answer=answer, reply=reply, kind=kind,
                          right=reply.strip().rstrip(".").strip() == answer))
    if split == "train":
        return [row("VQA: all, training's combinations", [d["right"] for d in items])], items
    rows = [row(f"VQA: {kind}", [d["right"] for d in items if d["kind"] == kind]) for kind in KINDS]
    return rows + [row("VQA: all", [d["right"] for d in items])], items


def captions(model, sizes, seed, split="eval"):
    # right: every shape of the scene named with its true colour and shape, and every claim the
    # caption makes (its sizes and positions too) true of one of the scene's shapes
    items = []
    for i in tqdm(range(sizes.captions), desc="captions", unit="caption", disable=None):
        truth, scene = data.caption_example(seed, i, split)
        segments = model.generate(data.IMAGE_TOKEN, [data.draw(scene)], layout="i2t",
                                  max_new_tokens=sizes.caption_tokens, max_images=0,
                                  progress=False)
        text = "".join(segments).strip()
        claims = judge.parse_caption(text)
        named = all(any(c.get("color") == s.color and c.get("shape") == s.shape for c in claims)
                    for s in scene.shapes)
        true = all(any(true_of(c, s) for s in scene.shapes) for c in claims)
        items.append(dict(truth=truth, caption=text, right=named and true))
    return [row("caption: all shapes named, all true", [d["right"] for d in items])], items


# ------------------------------------------------------------------------------------ documents

# A sentence that opens as FIRST's and NEXT's do ("Next comes ...") announces a picture to come:
# it is not said of the picture before it.
ANNOUNCE = tuple(t.split("{}")[0].strip().lower() for t in data.FIRST + data.NEXT)


def back_statements(text):
    # the claims of the text after a picture, leaving out the sentences that announce the next one
    sentences = re.findall(r"[^.!?]+[.!?]?", text)
    return [c for s in sentences if not s.strip().lower().startswith(ANNOUNCE)
            for c in judge.parse_caption(s)]


def documents(model, sizes, sampling, seed, out, split="eval"):
    # Each opening line is continued with its picture drawn first (force_image), then whatever the
    # model writes: text, up to DOCUMENT_IMAGES pictures, until it ends or the budget runs out.
    # It ended itself if it wrote fewer than document_tokens tokens: generate's budget counts each
    # text token and each <dream_start>. The text is re-tokenized to count (generate returns
    # strings): exact where the model writes the tokenizer's own splits, as it was trained on.
    g, docs = generator(seed, 2), []
    (out / "documents").mkdir(exist_ok=True)
    for i in tqdm(range(sizes.documents), desc="documents", unit="document", disable=None):
        rng = random.Random(f"{seed}/benchmark/document/{i}")
        scene = data.random_scene(rng, split, n_shapes=1)
        asked = scene.shapes[0]
        opening = data.FIRST[i % len(data.FIRST)].format(data.caption(scene, rng))
        # the trailing space: training's "Here is a red circle. <image>" has it before the slot
        segments = model.generate(opening + " ", max_new_tokens=sizes.document_tokens,
                                  force_image=True, max_images=DOCUMENT_IMAGES, generator=g,
                                  progress=False, **sampling)
        written, statements = [], []
        for j, seg in enumerate(segments):
            if isinstance(seg, str):
                written.append(dict(text=seg))
                continue
            name = f"documents/{i}_{len(written)}.png"
            seg.save(out / name)
            found = judge.analyse_scene(seg)
            written.append(dict(image=name, seen=[said(f) for f in found]))
            after = segments[j + 1] if j + 1 < len(segments) else ""
            statements += [dict(claim=c, true=any(true_of(c, f) for f in found))
                           for c in back_statements(after if isinstance(after, str) else "")]
        big = largest(judge.analyse_scene(segments[0]))
        tokens = sum(len(model.tokenizer.encode(s, add_special_tokens=False).ids) if
                     isinstance(s, str) else 1 for s in segments)
        docs.append(dict(opening=opening, asked=f"{asked.color} {asked.shape}", segments=written,
                         statements=statements, tokens=tokens,
                         picture=big is not None and (big.color, big.shape) == (asked.color,
                                                                                 asked.shape),
                         ended=tokens < sizes.document_tokens))
    rows = [row("document: the picture asked for", [d["picture"] for d in docs]),
            row("document: refers back", [bool(d["statements"]) for d in docs]),
            row("document: back statements true",
                [s["true"] for d in docs for s in d["statements"]]),
            row("document: ends", [d["ended"] for d in docs])]
    return rows, docs


# ----------------------------------------------------------------------------------- the report

def table(rows):
    lines = [f"{'':<38} {'n':>5} {'value':>6}   95% interval"]
    lines += [f"{r['name']:<38} {r['n']:>5} {pages.proportion(r)[0]:>6}   "
              f"[{r['low']:.2f}, {r['high']:.2f}]" for r in rows]
    return "\n".join(lines)


def grid(rows, scale=2, pad=6, label_h=14, line_h=11):
    # [(label, [image], [[line, ...] per image])] -> one image: each row's label above its images,
    # scaled up (nearest), each image's lines (what the analyser saw) under it
    S, pen = rows[0][1][0].width * scale, ImageDraw.Draw(Image.new("RGB", (1, 1)))
    cell = max([S] + [int(pen.textlength(t)) for _, _, seen in rows for lines in seen
                      for t in lines[:2]]) + pad
    lines = max(min(2, len(x)) for _, _, seen in rows for x in seen) + 1  # "+1 more" too
    height = label_h + S + lines * line_h + pad
    width = max(pad + max(len(ims) for _, ims, _ in rows) * cell,
                max(int(pen.textlength(label)) for label, _, _ in rows) + 2 * pad)
    canvas = Image.new("RGB", (width, pad + len(rows) * height), "white")
    pen = ImageDraw.Draw(canvas)
    for r, (label, images, seen) in enumerate(rows):
        y = pad + r * height
        pen.text((pad, y), label, fill="black")
        for c, (im, found) in enumerate(zip(images, seen)):
            x = pad + c * cell
            canvas.paste(im.resize((S, S), Image.NEAREST), (x, y + label_h))
            # "large red circle on the left" -> "red circle left"
            text = [" ".join(f.split()[1:3] + f.split()[-1:]) for f in found[:2]] or ["nothing"]
            text += [f"+{len(found) - 2} more"] if len(found) > 2 else []
            for k, t in enumerate(text):
                pen.text((x, y + label_h + S + 1 + k * line_h), t, fill="dimgray")
    return canvas


def page(report):
    # eval.html: the table, the grids, the answers, captions and documents
    d = report["details"]
    body = [f"<h1>DreamLLM on the shapes world</h1><p>{html.escape(report['about'])}</p>",
            pages.rows_table(report["rows"]),
            '<h2>Creation: held-out shapes</h2><img src="eval_grid.png">',
            '<h2>Creation: two shapes</h2><img src="eval_two_shapes.png">']
    if "vqa" not in d:  # --text-encoder: the creation rows alone
        return pages.page("DreamLLM benchmark", body)
    body += [f"<h2>{title}</h2>" + pages.table(["question", "answer", "reply"],
                                               [[q["question"], q["answer"], q["reply"]] for q in d[k]],
                                               marks=[mark(q) for q in d[k]])
             for k, title in (("vqa", "VQA"), ("vqa_seen", "VQA on training's own pairs"))]
    body += ["<h2>Captions</h2>" + pages.table(["the picture", "the model's caption"],
                                               [[c["truth"], c["caption"]] for c in d["captions"]],
                                               marks=[mark(c) for c in d["captions"]]),
             "<h2>Documents</h2>"]
    for doc in d["documents"]:
        verdict = ", ".join(f"{' '.join(c['claim'].values())}: {'true' if c['true'] else 'false'}"
                            for c in doc["statements"]) or "no statement about a picture"
        end = "ended" if doc["ended"] else "ran out of tokens"
        body += [f"<p><b>{html.escape(doc['opening'])}</b></p>", pages.document(doc["segments"]),
                 f"<p><small>{html.escape(verdict)}; {end}</small></p>"]
    return pages.page("DreamLLM benchmark", body)


def mark(item):  # a judged item's row class in eval.html
    return "ok" if item["right"] else "no"


@torch.no_grad()
def benchmark(model, out, seed=0, sampling=None, sizes=None, beams=1, meta=None,
              condition=None, split="eval"):
    # -> the rows; writes eval.json, eval.html, the grids and the documents' PNGs into `out`.
    # sampling: SAMPLING's keys (None: SAMPLING); sizes: Sizes (None: its defaults); meta: what
    # eval.json records of the run; condition: prompt -> (1, L, C) in place of the LLM's, the
    # creation rows only, e.g. the text encoder's own E(prompt) or fitted_conditions: the ceilings;
    # split: the held-out pairs asked about, "eval" (HELD_OUT, reported) or "val" (VALIDATION)
    sampling, sizes, out, start = sampling or SAMPLING, sizes or Sizes(), Path(out), time.time()
    out.mkdir(parents=True, exist_ok=True)
    rows, details, grids = create(model, sizes, sampling, seed, condition, split)
    if condition is None:  # the rest needs the LLM
        parts = [("vqa", lambda: vqa(model, sizes, seed, beams, split)),
                 ("vqa_seen", lambda: vqa(model, sizes, seed, beams, split="train")),
                 ("captions", lambda: captions(model, sizes, seed, split)),
                 ("documents", lambda: documents(model, sizes, sampling, seed, out, split))]
        for name, part in parts:
            more, details[name] = part()
            rows += more
    for name, rows_of_images in grids.items():
        grid(rows_of_images).save(out / name)
    # a glance for report.py's summary.png: six pictures of each single prompt, two of two shapes
    glance = [(p, ims[:6], seen[:6]) for p, ims, seen in grids["eval_grid.png"]]
    grid(glance + [(p, ims[:6], seen[:6]) for p, ims, seen in grids["eval_two_shapes.png"][:2]]
         ).save(out / "held_out.png")
    seconds = time.time() - start
    about = (f"split {split} ({', '.join(f'{c} {s}' for c, s in data.SPLITS[split])}), "
             f"seed {seed}, {sampling['sampler']} {sampling['steps']} steps, guidance "
             f"{sampling['guidance']}; {seconds:.0f} s" +
             "".join(f"; {k} {v}" for k, v in (meta or {}).items()))
    report = dict(rows=rows, about=about, split=split, seed=seed, sampling=sampling, sizes=asdict(sizes),
                  seconds=round(seconds, 1), **(meta or {}), details=details)
    (out / "eval.json").write_text(json.dumps(report, indent=1) + "\n")
    (out / "eval.html").write_text(page(report), encoding="utf-8")
    print(f"\n{table(rows)}\n\n{about}\nwrote {out / 'eval.html'} and {out / 'eval.json'}")
    return rows


def load(args):
    # -> (model, what eval.json records of it): a train.py run, or the preset as built
    if args.text_encoder or args.fit_condition:
        flag = "--fit-condition" if args.fit_condition else "--text-encoder"
        model = cli.build_model(args.preset, seed=args.seed)
        if model.clip.config.text is None:
            raise cli.Stop(f"{flag}: preset {args.preset} has no text encoder (toy has)")
        if args.fit_condition:
            return model, dict(model=f"{args.preset}'s SD, drawn from a condition fitted to each "
                               f"prompt ({args.fit_condition} steps from its text encoder's states)")
        return model, dict(model=f"{args.preset}'s SD, drawn from its text encoder's states")
    if args.untrained:
        return cli.build_model(args.preset, seed=args.seed), dict(model=f"{args.preset}, untrained")
    _, run = checkpoint.read_final(args.ckpt)  # a curriculum's folder: its last stage trained
    if run is None:
        raise cli.Stop(f"{args.ckpt}: no checkpoint there (no step-N/ folder, no stage of a "
                       "curriculum); train one with train.py")
    if Path(args.out).resolve() == Path(args.ckpt).resolve():
        raise cli.Stop(f"--out {args.out} is the checkpoint's folder; write somewhere else")
    model = cli.build_model(run["preset"], seed=run["seed"], **run["dream_config"])
    model.load_trained_state(checkpoint.read_tensors(run, "model"))
    return model, dict(model=str(run["path"]))  # the checkpoint's step-N folder


def main(argv=None):
    p = cli.Parser(prog="python -m shapes.benchmark", description="The shapes world's benchmark "
                   "of a DreamLLM: creation, VQA, captions, documents.", formatter_class=cli.Help)
    p.add_argument("--ckpt", default="out/toy", help="a train.py run's folder, or a "
                   "curriculum's (its last stage)")
    p.add_argument("--untrained", action="store_true", help="no checkpoint: --preset as built")
    p.add_argument("--text-encoder", action="store_true", help="no LLM: --preset's SD drawn "
                   "from its own text encoder's states of each prompt, as it was trained (the "
                   "ceiling of the creation rows; those rows only)")
    p.add_argument("--fit-condition", type=int, default=0, metavar="STEPS", help="no LLM: "
                   "--preset's SD drawn from a condition fitted to each creation prompt by STEPS "
                   "steps of its denoising loss on drawings of that prompt, from E(prompt): what "
                   "the frozen UNet can be made to draw (those rows only; 400: ~40 s a prompt)")
    p.add_argument("--preset", default="toy", help="the preset of --untrained, --text-encoder, "
                   "--fit-condition")
    p.add_argument("--out", default="out/eval", help="folder for eval.json, eval.html, the PNGs")
    p.add_argument("--seed", type=int, default=0, help="the items and the noise")
    p.add_argument("--split", choices=list(data.SPLITS), default="eval", help="the held-out pairs "
                   "asked about: eval, data.HELD_OUT's, the rows we report; val, data.VALIDATION's, "
                   "where recipes are chosen")
    p.add_argument("--quick", action="store_true", help="a few of each (QUICK), to see it run")
    for f in fields(Sizes):
        p.add_argument(f"--{f.name.replace('_', '-')}", type=int, metavar="N",
                       help=f"{f.metadata['help']} (default: {f.default}; --quick: "
                       f"{getattr(QUICK, f.name)})")
    p.add_argument("--steps", type=int, default=SAMPLING["steps"], help="denoising steps")
    p.add_argument("--guidance", type=float, default=SAMPLING["guidance"], help="CFG scale")
    p.add_argument("--sampler", choices=["ddim", "ddpm"], default=SAMPLING["sampler"])
    p.add_argument("--device", default="auto", help="auto: cuda (bf16 autocast), else mps, "
                   "else cpu")
    args = p.parse_args(argv)
    given = {f.name: getattr(args, f.name) for f in fields(Sizes) if getattr(args, f.name)
             is not None}
    if args.fit_condition < 0:
        p.error("--fit-condition must be at least 1 (or left out)")
    if bad := [k for k, v in dict(given, steps=args.steps).items() if v < 1]:
        p.error(f"--{bad[0].replace('_', '-')} must be at least 1")
    sizes = replace(QUICK if args.quick else Sizes(), **given)
    sampling = dict(SAMPLING, steps=args.steps, guidance=args.guidance, sampler=args.sampler)

    def run():
        device = cli.pick_device(args.device)
        model, meta = load(args)
        model = model.to(device).eval()
        with cli.autocast(device):
            condition = None  # the LLM's
            if args.fit_condition:
                condition = fitted_conditions(model, sizes, args.seed, args.fit_condition,
                                              split=args.split)
            elif args.text_encoder:
                condition = lambda p: model.text_states([p])
            benchmark(model, args.out, args.seed, sampling, sizes, meta=meta, condition=condition,
                      split=args.split)
    cli.main(run, "python -m shapes.benchmark")


if __name__ == "__main__":
    main()
