"""Linear probes of the frozen CLIP: what its features of a picture tell a reader trained on
training's colour-shape pairs, when it is shown pairs training never showed.

    python -m tools.probe                   # the toy CLIP, every layer (about 6 min, 2-core CPU)
    python -m tools.probe --layers -2 --pictures 1000

A DreamLLM reads one layer of CLIP (DreamConfig.clip_layer: the penultimate, as LLaVA) through a
linear projector, and every reader trained on the shapes world's training split sees only its
pairs. A probe is the simplest such reader: a softmax classifier, linear in the features, fitted
on single-shape pictures of training's pairs (data.combos("train")) and tested on fresh pictures
of those pairs and of the held-out ones (data.HELD_OUT). Two views of a layer's N patch features:
  flat  all N in order, (N * width): where a shape is, as a reader that knows each patch's place
  mean  their mean, (width): what a reader that ignores the places can use
Where a probe reads the held-out pairs far worse than training's, the layer has tied that attribute
to the pairs it came with, and a reader fitted on the split inherits the tie.
"""
import random

import torch
import torch.nn.functional as F
from tqdm import tqdm

from plumbing import cli
from shapes import data

ATTRIBUTES = {"colour": ("color", list(data.COLORS)), "shape": ("shape", list(data.SHAPES)),
              "size": ("size", list(data.SIZES)), "position": ("position", list(data.POSITIONS))}
POOLS = {"flat": lambda f: f.flatten(1), "mean": lambda f: f.mean(1)}  # (n, N, width) -> (n, d)


def pictures(split, n, seed):  # n single-shape scenes of a split, and their pictures
    rng = random.Random(f"probe/{seed}/{split}")
    scenes = [data.random_scene(rng, split, n_shapes=1) for _ in range(n)]
    return scenes, [data.draw(s) for s in scenes]


def classes_of(scenes, field, classes):  # each single-shape scene's attribute, as a class index
    return torch.tensor([classes.index(getattr(s.shapes[0], field)) for s in scenes])


@torch.no_grad()
def patch_features(model, images, layer, batch=256):  # -> (n, N, width), the CLS token left out
    pixels = model.clip_pixels(images)
    return torch.cat([model.clip.image_features(p, layer)[:, 1:] for p in pixels.split(batch)])


def fit(x, y, n_classes, steps=200, lr=1e-2, l2=1e-3):
    # a linear softmax probe on standardised features, full batch -> predict(x) -> class indices
    mean, std = x.mean(0), x.std(0) + 1e-5
    # w as nn.Linear holds it, (n_classes, d): F.linear's backward is then a product the CPU's BLAS
    # does fast (8x faster than z @ w's on the card's 2000 x 8192 features, 2-core CPU)
    w = torch.zeros(n_classes, x.shape[1], requires_grad=True)
    b = torch.zeros(n_classes, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr)
    z = (x - mean) / std
    for _ in range(steps):
        opt.zero_grad()
        (F.cross_entropy(F.linear(z, w, b), y) + l2 * w.pow(2).sum()).backward()
        opt.step()
    return lambda x: F.linear((x - mean) / std, w, b).argmax(1).detach()


def probe(model, layers, n_train=2000, n_test=500, seed=0, attributes=ATTRIBUTES, pools=POOLS):
    # -> [dict(layer, pool, attribute, seen, held_out)]: each probe's accuracy on fresh pictures of
    # training's pairs (seen) and of the held-out pairs
    sets = {name: pictures(split, n, f"{seed}/{name}") for name, split, n in
            (("fit", "train", n_train), ("seen", "train", n_test), ("held_out", "eval", n_test))}
    labels = {attribute: {name: classes_of(scenes, field, classes) for name, (scenes, _) in
                          sets.items()} for attribute, (field, classes) in attributes.items()}
    rows = []
    for layer in tqdm(layers, desc="layers", unit="layer", disable=None):
        feats = {name: patch_features(model, images, layer) for name, (_, images) in sets.items()}
        for pool, view in pools.items():
            x = {name: view(f) for name, f in feats.items()}
            for attribute, y in labels.items():
                predict = fit(x["fit"], y["fit"], len(attributes[attribute][1]))
                right = {name: (predict(x[name]) == y[name]).float().mean().item()
                         for name in ("seen", "held_out")}
                rows.append(dict(layer=layer, pool=pool, attribute=attribute, **right))
    return rows


def table(rows, read=None):
    # one line per layer and view: each attribute's accuracy, training's pairs / held-out pairs;
    # the layer a DreamLLM reads is marked
    lines = ["layer  view  " + "".join(f"{a:>14}" for a in ATTRIBUTES)]
    for layer in dict.fromkeys(r["layer"] for r in rows):
        for pool in POOLS:
            cells = {r["attribute"]: f"{r['seen']:.2f} / {r['held_out']:.2f}" for r in rows
                     if r["layer"] == layer and r["pool"] == pool}
            name = f"{layer}" + ("*" if layer == read else "")
            lines.append(f"{name:<7}{pool:<6}" + "".join(f"{cells[a]:>14}" for a in ATTRIBUTES))
    return "\n".join(lines)


def main(argv=None):
    p = cli.Parser(prog="python -m tools.probe", description=__doc__.split("\n\n")[0],
                   formatter_class=cli.Help)
    p.add_argument("--preset", default="toy", help="whose CLIP (the shapes world's: toy)")
    p.add_argument("--layers", type=int, nargs="+", help="CLIP layers, HF's numbering: 0 the "
                   "embeddings, L the last; negative from the end (default: every one)")
    p.add_argument("--pictures", type=int, default=2000, help="pictures the probes are fitted on")
    p.add_argument("--tests", type=int, default=500, help="pictures each accuracy is measured on")
    p.add_argument("--seed", type=int, default=0, help="the pictures")
    args = p.parse_args(argv)
    if args.pictures < 10 or args.tests < 1:
        p.error("--pictures must be at least 10 and --tests at least 1")

    def run():
        model = cli.build_model(args.preset, seed=args.seed).eval()
        L = model.clip.config.vision.n_layers
        layers = range(L + 1) if args.layers is None else args.layers
        if bad := [k for k in layers if not -(L + 1) <= k <= L]:
            raise cli.Stop(f"--layers {bad[0]}: {args.preset}'s CLIP has layers 0 to {L} "
                           f"(or -{L + 1} to -1)")
        rows = probe(model, [k % (L + 1) for k in layers], args.pictures, args.tests, args.seed)
        read = model.config.clip_layer % (L + 1)
        print(f"accuracy on fresh pictures of training's pairs / of held-out pairs ({args.tests} "
              f"each), probes fitted on {args.pictures} of training's; * the layer a DreamLLM reads")
        print(table(rows, read))
    cli.main(run, "python -m tools.probe")


if __name__ == "__main__":
    main()
