"""The read-back experiment: does the text after a written image refer to that image?

A trained run (stage I-creation, then I-comprehension with --init, so the model both draws and
reads) writes documents that open with a picture, `generate("", force_image=True)`: the prompt
names nothing, so the text after the picture can only name its colour by reading it. The same
documents (the same seeds, hence the same pictures) are written three ways:
  read    as DreamLLM does: the drawn picture read back into the read slot (_dream_then_read);
  blank   the read slot holds an empty canvas instead: the layout kept, the picture not read;
  none    no read slot at all: <dream_end>, then the text.
and the colour the text names is compared with the one judge.analyse sees in the picture.

    python -m tools.exercises.read_back --ckpt out/exercises/comp --documents 48
"""
import argparse
import sys
from pathlib import Path

import torch
from PIL import Image

from plumbing import checkpoint, cli
from shapes import data, judge


def load(folder):
    run = checkpoint.read_run(folder)
    if run is None:
        raise SystemExit(f"read_back: {folder} holds no checkpoint (train one with train.py)")
    model = cli.build_model(run["preset"], seed=run["seed"], **run["dream_config"])
    model.load_trained_state(checkpoint.read_tensors(run, "model"))
    return model.eval(), run


def without_read_slot(model):
    # _dream_then_read with the read slot left out: <dream_end> follows the queries, then the text
    def dream_only(cache, sampling):
        dream = torch.tensor([model.dream_slot()[:-1]], device=model.device)
        hq = model.llm.hidden_states(inputs_embeds=model.embed(dream), cache=cache)[:, 1:]
        image = model.sample_images(model.condition_projector(hq), **sampling)[0]
        end = torch.tensor([model.dream_slot()[-1:]], device=model.device)
        return image, model.llm.hidden_states(end, cache=cache)[:, -1]
    return dream_only


def named_colour(text):  # the first palette colour the text names, or None
    words = text.lower().replace(".", " ").split()
    return next((w for w in words if w in data.COLORS), None)


def measure(model, way, n, steps, guidance):
    # -> rows (seed, colour seen in the picture, colour named after it, the text)
    original = {"clip_pixels": model.clip_pixels, "_dream_then_read": model._dream_then_read}
    if way == "blank":
        canvas = Image.new("RGB", (data.IMAGE_SIZE,) * 2, data.BACKGROUND)
        model.clip_pixels = lambda images: original["clip_pixels"]([canvas] * len(images))
    elif way == "none":
        model._dream_then_read = without_read_slot(model)
    rows = []
    try:
        for seed in range(n):
            g = torch.Generator().manual_seed(seed)
            with torch.no_grad():
                segments = model.generate("", max_new_tokens=16, guidance=guidance, steps=steps,
                                          generator=g, force_image=True, progress=False)
            image = next(s for s in segments if not isinstance(s, str))
            after = "".join(s for s in segments[segments.index(image) + 1:] if isinstance(s, str))
            rows.append((seed, judge.analyse(image)[0], named_colour(after), after.strip()))
    finally:
        for name, f in original.items():  # instance attributes only: the class keeps its own
            model.__dict__.pop(name, None)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.exercises.read_back",
                                description=__doc__.split("\n")[0])
    p.add_argument("--ckpt", default="out/exercises/comp", help="a run that draws and reads")
    p.add_argument("--documents", type=int, default=48, help="documents per way")
    p.add_argument("--steps", type=int, default=30, help="DDIM steps per picture")
    p.add_argument("--guidance", type=float, default=2.0, help="classifier-free guidance")
    p.add_argument("--show", type=int, default=3, help="documents to print per way")
    args = p.parse_args(argv)
    if not Path(args.ckpt).is_dir():
        p.exit(2, f"{p.prog}: error: --ckpt {args.ckpt}: no such folder (see -h)\n")
    model, run = load(args.ckpt)
    if "visual_projector" not in run["groups"]:
        print(f"note: {args.ckpt} never trained the visual projector: it cannot read",
              file=sys.stderr)
    print(f"{'way':<6} {'names a colour':>14} {'the colour seen':>16}   "
          f"(of {args.documents} documents)")
    for way in ("read", "blank", "none"):
        rows = measure(model, way, args.documents, args.steps, args.guidance)
        named = [r for r in rows if r[2] is not None]
        right = sum(seen == said for _, seen, said, _ in named)
        print(f"{way:<6} {len(named) / len(rows):>14.2f} {right / len(rows):>16.2f}")
        for seed, seen, said, text in rows[:args.show]:
            print(f"         seed {seed}: picture {seen}, text {text!r}")


if __name__ == "__main__":
    main()
