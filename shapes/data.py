"""The shapes world: procedural toy data for DreamLLM, and readers for real data manifests.

A scene is one or two shapes (circle, square, triangle) in a colour from a fixed palette, small or
large, at a named position, drawn with Pillow on a light grey 64x64 canvas. From a seed, data.py
gives without end, and reproducibly by index (`*_example(seed, i)` is a pure function, so a resumed
run can rebuild batch i):
  captions(seed)   -> (caption, image)          "a small red circle on the left"
  documents(seed)  -> (text, [images])          "Here is a red circle. <image> Next comes ... <image>"
  questions(seed)  -> (image, question, answer) ("What colour is the square?", "blue")
  text_corpus(seed, n) -> n lines of the above as text, for the toy tokenizer and LLM.
`split="train"` never shows a HELD_OUT or VALIDATION colour-shape combination, `split="eval"` shows
only HELD_OUT's (the results we report), `split="val"` only VALIDATION's (where recipes are chosen),
`split="all"` shows everything (for backbones that, like Stable Diffusion, have seen the world).
What an image shows and what a sentence claims are judged in judge.py.

Real data: JSONL manifests, one JSON object per line, image paths relative to the manifest's folder.
  image-text pairs      {"image": "imgs/0001.png", "text": "a photo of a dog"}
  interleaved documents {"text": "A dog. <image> It runs. <image>", "images": ["a.png", "b.png"]}
Each `<image>` in a document's text marks where the next image goes, so their counts must agree.
`read_pairs(path)` yields (text, image) and `read_documents(path)` yields (text, [images]), images
as RGB PIL images, the same shapes as the synthetic streams. Blank lines are skipped; anything else
that is wrong raises ValueError("manifest.jsonl:LINE: problem").
"""
import itertools
import json
import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, UnidentifiedImageError

IMAGE_TOKEN = "<image>"
IMAGE_SIZE = 64
BACKGROUND = (230, 230, 230)  # light grey
# Saturated and far apart (closest pair, orange-yellow, is ~90 apart in RGB; every colour is
# >190 from the background), so the analyser tells them apart through blur and noise.
COLORS = {
    "red": (215, 35, 40),
    "orange": (250, 130, 20),
    "yellow": (240, 220, 40),
    "green": (40, 160, 60),
    "blue": (40, 90, 220),
    "purple": (140, 60, 180),
}
SHAPES = ("circle", "square", "triangle")
SIZES = {"small": 8, "large": 13}  # half-extent in pixels of the 64x64 grid
POSITIONS = {"on the left": (16, 32), "on the right": (48, 32), "at the top": (32, 16),
             "at the bottom": (32, 48), "in the middle": (32, 32)}  # centre (x, y)
PAIRS = (("on the left", "on the right"), ("at the top", "at the bottom"))  # two shapes never touch
JITTER = 2  # centres move up to this many pixels, so no two images of a caption are identical
# Kept out of split="train" for evaluation (the reported rows) ...
HELD_OUT = (("blue", "triangle"), ("green", "circle"), ("orange", "triangle"), ("red", "square"))
# ... and for choosing recipes, step counts, weights and sampler settings, never reported as the
# result. Training keeps every colour in two pairs and every shape in four.
VALIDATION = (("yellow", "square"), ("purple", "circle"))
SPLITS = {"eval": HELD_OUT, "val": VALIDATION}
NUMBERS = {1: "one", 2: "two", 3: "three"}


@dataclass(frozen=True)
class Shape:
    color: str     # a key of COLORS
    shape: str     # one of SHAPES
    size: str      # a key of SIZES
    position: str  # a key of POSITIONS
    dx: int = 0    # jitter of the centre, pixels of the 64 grid
    dy: int = 0


@dataclass(frozen=True)
class Scene:
    shapes: tuple  # of Shape; one or two, never overlapping


# ---------------------------------------------------------------------------------------- scenes

def combos(split="train"):
    """The (colour, shape) combinations a split may show."""
    every = [(c, s) for c in COLORS for s in SHAPES]
    if split == "train":
        return [cs for cs in every if cs not in HELD_OUT + VALIDATION]
    if split in SPLITS:
        return list(SPLITS[split])
    if split == "all":
        return every
    raise ValueError(f"unknown split {split!r} (expected 'train', 'eval', 'val' or 'all')")


def random_scene(rng, split="train", n_shapes=None):
    """A scene of n_shapes (1 or 2; random if None) distinct colour-shape combinations of the split."""
    n = n_shapes or rng.choice((1, 1, 2))  # two thirds single shapes: the form evaluation asks for
    picked = rng.sample(combos(split), n)
    where = [rng.choice(list(POSITIONS))] if n == 1 else list(rng.choice(PAIRS))
    rng.shuffle(where)  # either shape may be named first
    return Scene(tuple(Shape(c, s, rng.choice(list(SIZES)), p, rng.randint(-JITTER, JITTER),
                             rng.randint(-JITTER, JITTER)) for (c, s), p in zip(picked, where)))


def draw(scene, size=IMAGE_SIZE, supersample=4):
    """The scene as a size x size RGB image. Drawn at supersample x the size and box-averaged down, so
    edges are anti-aliased while shape interiors keep their palette colour exactly."""
    k = size * supersample / IMAGE_SIZE  # scene coordinates live on the 64 grid
    img = Image.new("RGB", (size * supersample,) * 2, BACKGROUND)
    pen = ImageDraw.Draw(img)
    for s in scene.shapes:
        (x, y), r = POSITIONS[s.position], SIZES[s.size]
        x, y = x + s.dx, y + s.dy
        box = [(x - r) * k, (y - r) * k, (x + r) * k - 1, (y + r) * k - 1]  # Pillow's box is inclusive
        if s.shape == "circle":
            pen.ellipse(box, fill=COLORS[s.color])
        elif s.shape == "square":
            pen.rectangle(box, fill=COLORS[s.color])
        else:  # apex up, base along the bottom: it fills half its bounding box
            pen.polygon([(x * k, box[1]), (box[2], box[3]), (box[0], box[3])], fill=COLORS[s.color])
    return img.reduce(supersample)


def nearest_shapes(scene, grid):
    """-> [grid * grid] the index (in scene.shapes) of the shape whose centre is nearest each cell of
    the picture cut into grid x grid, row-major as a ViT orders its patches: which shape a patch
    belongs to."""
    centres = [(POSITIONS[s.position][0] + s.dx, POSITIONS[s.position][1] + s.dy) for s in scene.shapes]
    cell = IMAGE_SIZE / grid
    return [min(range(len(centres)), key=lambda k: (x - centres[k][0]) ** 2 + (y - centres[k][1]) ** 2)
            for y, x in itertools.product(((i + 0.5) * cell for i in range(grid)), repeat=2)]


FIELDS = {"colour": "color", "shape": "shape", "place": "position"}  # what a twin swaps
VALUES = {"color": list(COLORS), "shape": list(SHAPES), "position": list(POSITIONS)}  # each field's


def swapped(scene, what):
    """A two-shape scene with its shapes' colours, shapes or places (a key of FIELDS) exchanged:
    the twin a compositional test sets beside the truth ("a red circle on the left and a blue
    square on the right" -> "... a blue circle on the left and a red square ..."). None where the
    two shapes share that attribute (the twin would be the scene itself)."""
    a, b = scene.shapes
    field = FIELDS[what]
    if getattr(a, field) == getattr(b, field):
        return None
    return Scene((replace(a, **{field: getattr(b, field)}), replace(b, **{field: getattr(a, field)})))


# ------------------------------------------------------------------------------------------ text

def _phrase(s, form):
    words = {"full": [s.size, s.color, s.shape, s.position], "no size": [s.color, s.shape, s.position],
             "no position": [s.size, s.color, s.shape], "short": [s.color, s.shape]}[form]
    return "a " + " ".join(words)


FORMS = ("full", "full", "no size", "no position", "short")  # a caption's form, drawn from


def caption(scene, rng=None, form="full"):
    """'a small red circle on the left [and a large blue square on the right]'. With an rng, some
    captions drop the size or the position, so a model also learns the short forms prompts use."""
    if rng is not None:
        form = rng.choice(FORMS)
    return " and ".join(_phrase(s, form) for s in scene.shapes)


def short_caption(scene):
    """'a red circle': the form of the evaluation prompts."""
    return caption(scene, form="short")


FIRST = ("Here is {}.", "This picture shows {}.", "Look at {}.", "Let me draw {}.")
NEXT = ("Beside it sits {}.", "Next comes {}.", "The next picture shows {}.", "And here is {}.")
AFTER = ("This is {}.", "In this picture there is {}.", "It shows {}.")
# what text after a picture says about one of its shapes: the world's text, the toy LLM's corpus
BACK = ("It is a {color} {shape}.", "The {color} {shape} is {size}.", "The {shape} is {color}.",
        "That {shape} is {position}.")
# ... and DreamLLM's training documents: its colour or its shape, never the two together, as
# training's questions name a shape (_question). Training shows training's pairs only, and there
# "The blue" is always followed by "circle" or "square": after a held-out blue triangle, drawn and
# named right, the model wrote "The blue circle is large." (8 of seed 1's 15 false statements).
# Chosen on VALIDATION (docs/log.md, 2026-12-07, nineteenth session).
TRAINING_BACK = ("It is {color}.", "The {color} one is {size}.", "It is a {shape}.",
                 "That {shape} is {position}.")


def _question(scene, rng, training=False):
    """One question about the scene and its answer, always answerable without ambiguity.
    training: the shape is named as train.py's questions name it, never by its colour and shape
    together: by its place when its colour or shape is asked ("What shape is the thing on the
    left?"), by its colour or its shape alone where that picks it out when its place or size is
    ("Where is the yellow thing?"). Asked by the pair ("What shape is the yellow thing?", "Where is
    the yellow square?"), as the benchmark asks of held-out pictures, a reader trained on those
    words can answer from the pairs training showed, wrong on every held-out one."""
    s = rng.choice(scene.shapes)
    two = len(scene.shapes) == 2
    # Name the shape so that it is unique: a second shape of the same kind (or colour) means the
    # position has to be said too (random_scene never repeats a colour-shape combination).
    same_kind = two and scene.shapes[0].shape == scene.shapes[1].shape
    same_color = two and scene.shapes[0].color == scene.shapes[1].color
    kind = rng.choice(("colour", "shape", "count", "where", "size"))
    named = f"{s.color} {s.shape}"  # how a where or size question names it
    if training and kind in ("where", "size"):  # (a scene never shows a pair twice: one is unique)
        named = rng.choice([f"{s.color} thing"] * (not same_color) + [s.shape] * (not same_kind))
    if kind == "colour":
        the = f"the {s.shape} {s.position}" if same_kind else f"the {s.shape}"
        the = f"the thing {s.position}" if training else the
        return rng.choice(("What colour is {}?", "Which colour does {} have?")).format(the), s.color
    if kind == "shape":
        the = f"the {s.color} thing {s.position}" if same_color else f"the {s.color} thing"
        the = f"the thing {s.position}" if training else the
        return rng.choice(("What shape is {}?", "What kind of shape is {}?")).format(the), s.shape
    if kind == "count":
        return "How many shapes are there?", NUMBERS[len(scene.shapes)]
    if kind == "where":
        return f"Where is the {named}?", s.position
    return f"Is the {named} small or large?", s.size


# --------------------------------------------------------------------------------------- streams
# Every example is a pure function of (seed, split, stream, index): its own random.Random, seeded
# by a string (hashed with SHA-512 by the stdlib, so the same on every machine and Python run).

def _rng(seed, split, stream, i):
    combos(split)  # checks the split's name
    return random.Random(f"{seed}/{split}/{stream}/{i}")


def caption_example(seed, i, split="train"):
    """(caption, Scene) number i of the caption stream."""
    rng = _rng(seed, split, "caption", i)
    scene = random_scene(rng, split)
    return caption(scene, rng), scene


def document_example(seed, i, split="train", back=True, training=False):
    """(text with one IMAGE_TOKEN per image, [Scene] * 1-3) number i of the document stream. An image
    is either described before it (the model learns to write it) or after it (to read it); with `back`,
    the text after it often refers back to it, what DreamLLM reads a written image for: as the
    world's text says it (BACK), or as DreamLLM's training documents do (training: TRAINING_BACK)."""
    # the back references draw from a generator of their own: without them (back=False), the same documents
    rng, refer = _rng(seed, split, "document", i), _rng(seed, split, "back", i)
    scenes = [random_scene(rng, split) for _ in range(rng.randint(1, 3))]
    parts = ["Let us look at some shapes."] if len(scenes) > 1 and rng.random() < 0.3 else []
    forms = TRAINING_BACK if training else BACK
    for j, scene in enumerate(scenes):
        said, s = caption(scene, rng), refer.choice(scene.shapes)
        # the picture, then (7 times in 10) a sentence about one of its shapes, e.g. "It is purple."
        image = [IMAGE_TOKEN] + ([refer.choice(forms).format(**vars(s))] if back and refer.random() < 0.7 else [])
        if rng.random() < 0.6:
            parts += [rng.choice(NEXT if j else FIRST).format(said), *image]
        else:
            parts += [*image, rng.choice(AFTER).format(said)]
    if len(scenes) > 1 and rng.random() < 0.3:
        parts.append(f"That makes {NUMBERS[len(scenes)]} pictures.")
    return " ".join(parts), scenes


def question_example(seed, i, split="train", training=False):
    """(Scene, question, answer) number i of the question stream; training: the same scene and kind
    of question, the shape named as train.py's questions name it (_question)."""
    rng = _rng(seed, split, "question", i)
    scene = random_scene(rng, split)
    return (scene, *_question(scene, rng, training))


DRAW = ("Draw {}.", "Show me {}.", "Make a picture of {}.")
WRITE = "Write about {} shapes, with pictures."


def instruction_example(seed, i, split="train"):
    """(instruction, reply with one IMAGE_TOKEN per picture, [Scene]) number i of the instruction
    stream, the shapes world's supervised fine-tuning: "Draw a red circle." is answered with the
    picture, then a sentence about it; "Write about two shapes, with pictures." with a document
    of one picture per shape, each named before it and often referred back to after it."""
    rng = _rng(seed, split, "instruction", i)
    if rng.random() < 0.5:
        scene = random_scene(rng, split)
        s = rng.choice(scene.shapes)
        return (rng.choice(DRAW).format(caption(scene, rng)),
                f" {IMAGE_TOKEN} {rng.choice(TRAINING_BACK).format(**vars(s))}", [scene])
    scenes = [random_scene(rng, split, n_shapes=1) for _ in range(rng.randint(2, 3))]
    parts = []
    for j, scene in enumerate(scenes):
        s = scene.shapes[0]
        parts += [rng.choice(NEXT if j else FIRST).format(caption(scene, rng)), IMAGE_TOKEN]
        parts += [rng.choice(TRAINING_BACK).format(**vars(s))] if rng.random() < 0.7 else []
    return WRITE.format(NUMBERS[len(scenes)]), " " + " ".join(parts), scenes


KINDS = ("t2i", "i2t", "vqa", "document", "instruct", "opening")  # by what they teach


def unframe(text):
    """'Here is a red circle. <image>' -> 'a red circle <image>': a pair written as a document opens
    (FIRST), as the bare caption stage I-creation aligned on; any other text as it is."""
    slot = f" {IMAGE_TOKEN}"
    for before, after in (frame.split("{}") for frame in FIRST):
        if text.startswith(before) and text.endswith(after + slot):
            return text[len(before):-len(after + slot)] + slot
    return text


def example(kind, seed, i, split="train"):
    """Example i of a kind -> (text with IMAGE_TOKEN placeholders, [PIL images], layout, reply):
    "t2i" a caption, then its picture (the model writes it: layout "t2i"); "i2t" a picture, then
    its caption (it reads it: "i2t"); "vqa" a picture and a question, the answer the reply ("chat");
    "document" an interleaved document ("document"); "instruct" an instruction, the reply a
    document ("instruct"); "opening" a pair written as a document opens, "Here is a red circle.
    <image>" ("t2i"; the anchor holds it to its bare caption, unframe). The layouts are
    dreamllm.LAYOUTS'."""
    if kind == "instruct":
        instruction, reply, scenes = instruction_example(seed, i, split)
        return instruction, [draw(s) for s in scenes], "instruct", reply
    if kind == "document":
        text, scenes = document_example(seed, i, split, training=True)
        return text, [draw(s) for s in scenes], "document", ""
    if kind == "vqa":  # named as training names them (_question; docs/log.md, 2026-12-05, fourth session)
        scene, question, answer = question_example(seed, i, split, training=True)
        return f"{IMAGE_TOKEN} {question}", [draw(scene)], "chat", f" {answer}"
    if kind not in KINDS:
        raise ValueError(f"unknown kind of example {kind!r} (have {', '.join(KINDS)})")
    text, scene = caption_example(seed, i, split)
    if kind == "t2i":
        return f"{text} {IMAGE_TOKEN}", [draw(scene)], "t2i", ""
    if kind == "opening":  # a pair as a document opens: "Here is a small red circle. <image>"
        frame = random.Random(f"{seed}/{split}/opening/{i}").choice(FIRST)
        return f"{frame.format(text)} {IMAGE_TOKEN}", [draw(scene)], "t2i", ""
    return f"{IMAGE_TOKEN} {text}", [draw(scene)], "i2t", ""


def captions(seed, split="train", start=0):
    for i in itertools.count(start):
        text, scene = caption_example(seed, i, split)
        yield text, draw(scene)


def documents(seed, split="train", start=0):
    for i in itertools.count(start):
        text, scenes = document_example(seed, i, split)
        yield text, [draw(s) for s in scenes]


def questions(seed, split="train", start=0):
    for i in itertools.count(start):
        scene, question, answer = question_example(seed, i, split)
        yield draw(scene), question, answer


def text_corpus(seed, n, split="train", back=True):
    """n lines of shapes-world text, captions, documents and Q&A in turn (Q&A as
    '<image> What colour is the square? blue'): the toy tokenizer's and toy LLM's training text."""
    lines = []
    for i in range(n):
        kind, j = i % 3, i // 3
        if kind == 0:
            lines.append(caption_example(seed, j, split)[0])
        elif kind == 1:
            lines.append(document_example(seed, j, split, back)[0])
        else:
            _, question, answer = question_example(seed, j, split)
            lines.append(f"{IMAGE_TOKEN} {question} {answer}")
    return lines


def eval_prompts(split="eval"):
    """[(prompt, colour, shape)] for every combination held out in a split: 'a blue triangle', ..."""
    return [(f"a {c} {s}", c, s) for c, s in SPLITS[split]]


# ------------------------------------------------------------------------------ real data manifests

def _manifest(path, keys):
    """(line number, record, folder) for each non-blank line, with keys: {name: type} checked."""
    path = Path(path)
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: bad JSON ({e.msg}, column {e.colno})") from None
            if not isinstance(record, dict):
                raise ValueError(f"{path}:{n}: expected a JSON object, got {type(record).__name__}")
            for key, kind in keys.items():
                if key not in record:
                    raise ValueError(f"{path}:{n}: missing key {key!r}")
                if not isinstance(record[key], kind):
                    raise ValueError(f"{path}:{n}: {key!r} should be a {kind.__name__}")
            yield n, record, path


MAX_PIXELS = 64 * 2**20  # an image file larger than this is refused before it is decoded


def open_image(path):
    # A file -> an RGB PIL image, decoded safely: the size in its header is checked before any
    # pixel is (a PNG can claim 100000 x 100000 in a few bytes); 16-bit images are scaled to 8 bits
    # (Pillow's convert("RGB") would clip them, nearly white); palettes and alpha as CLIP's processor
    # reads them (convert("RGB")). ValueError, one line, for anything that is not a readable image.
    try:
        with Image.open(path) as im:
            if im.width * im.height > MAX_PIXELS:
                raise ValueError(f"{path}: {im.width} x {im.height} pixels, more than the "
                                 f"{MAX_PIXELS:,} an image may have here")
            im.load()  # every pixel, so a truncated file fails here
            if im.mode in ("I;16", "I;16L", "I;16B", "I"):  # 16-bit grey: 0..65535 -> 0..255
                grey = (np.asarray(im, dtype=np.float64) / 257).round().clip(0, 255).astype(np.uint8)
                return Image.fromarray(grey, "L").convert("RGB")
            return im.convert("RGB")
    except Image.DecompressionBombError:  # Pillow's own check, at twice its MAX_IMAGE_PIXELS
        raise ValueError(f"{path}: its header claims more than {MAX_PIXELS:,} pixels, the most an "
                         "image may have here (a decompression bomb?)") from None
    except (UnidentifiedImageError, OSError) as e:
        raise ValueError(f"{path}: not a readable image ({e.__class__.__name__})") from None


def _open(path, n, name):
    file = path.parent / name
    if not file.is_file():
        raise ValueError(f"{path}:{n}: image file not found: {file}")
    try:
        return open_image(file)
    except ValueError as e:
        raise ValueError(f"{path}:{n}: {e}") from None


def read_pairs(path):
    """(text, RGB image) for each line {"image": ..., "text": ...} of a JSONL manifest."""
    for n, record, path in _manifest(path, {"image": str, "text": str}):
        yield record["text"], _open(path, n, record["image"])


def read_documents(path):
    """(text, [RGB images]) for each line {"text": "... <image> ...", "images": [...]} of a manifest."""
    for n, record, path in _manifest(path, {"text": str, "images": list}):
        text, names = record["text"], record["images"]
        if not all(isinstance(name, str) for name in names):
            raise ValueError(f"{path}:{n}: 'images' should be a list of paths")
        if text.count(IMAGE_TOKEN) != len(names):
            raise ValueError(f"{path}:{n}: text has {text.count(IMAGE_TOKEN)} {IMAGE_TOKEN} placeholders "
                             f"but {len(names)} images")
        yield text, [_open(path, n, name) for name in names]
