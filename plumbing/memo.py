"""The frozen encoders' outputs, computed once per input: a speed-up of training, not of the method.

CLIP, the VAE and the text tower never train, so what they make of a picture or a caption is the
same each time it comes back, and in the shapes world pictures and captions come back often (a
single shape is one of 4,000 pictures). `remember(model)` puts a Memo in front of each frozen
encoder: a stage computes what it has not seen yet and looks up the rest. In the main job's
curriculum CLIP computes 8,095 of the 18,147 pictures read, the VAE 9,083 of the 22,813 written,
the text tower 3,611 of the 22,466 captions (docs/log.md, 2026-12-06, fourteenth session).

A row's encoding must not depend on the batch it first came in, or a resumed run (which starts
with an empty memo) would differ from the uninterrupted one. A row's result is the same in any
batch of two or more, but a batch of one takes another kernel on the CPU and rounds differently
(the toy VAE's latents by 3e-6), so a lone new row is encoded beside a copy of itself.
"""
import hashlib

import torch


STORES = {}  # the weights' fingerprint -> their rows: the stages of one curriculum share them


class Memo:
    # f(x, *args) -> a tensor or a tuple of tensors, row i of each a function of row i of x alone;
    # `weights` the module f computes with. Memo(f, weights)(x, *args) returns what f(x, *args)
    # would, computing f only on the rows of x not seen before with these args, by f or by another
    # Memo of the same weights (a later stage builds its model anew, from the same backbones). It
    # keeps `limit` rows at most (20,000 toy pictures' CLIP features and latents: about 0.8 GB) and
    # computes the rest each time, so a long run stays within memory.
    def __init__(self, f, weights, limit=20_000):
        device = str(next(weights.parameters()).device)
        fingerprint = hashlib.blake2b(f"{f.__name__} {device}".encode(), digest_size=16)
        for t in weights.state_dict().values():
            fingerprint.update(t.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
        self.f, self.limit, self.seen, self.computed = f, limit, 0, 0
        self.rows = STORES.setdefault(fingerprint.digest(), {})

    def __call__(self, x, *args):
        flat = x.detach().cpu().contiguous().view(torch.uint8).reshape(len(x), -1).numpy()
        keys = [hashlib.blake2b(row.tobytes() + repr(args).encode(), digest_size=16).digest()
                for row in flat]
        new = {}  # the rows not seen before: key -> where it first comes in x
        for i, k in enumerate(keys):
            if k not in self.rows:
                new.setdefault(k, i)
        found = {}
        if new:
            first = list(new.values())
            out = self.f(x[first * 2 if len(first) == 1 else first], *args)
            found = {k: out[i] if isinstance(out, torch.Tensor) else tuple(o[i] for o in out)
                     for i, k in enumerate(new)}
            if len(self.rows) + len(new) <= self.limit:
                self.rows.update(found)
        self.seen, self.computed = self.seen + len(keys), self.computed + len(new)
        rows = [found[k] if k in found else self.rows[k] for k in keys]
        if isinstance(rows[0], torch.Tensor):
            return torch.stack(rows)
        return tuple(torch.stack(column) for column in zip(*rows))


def remember(model):
    # model: a DreamLLM. Puts its frozen encoders, as training calls them, behind Memos: CLIP's
    # image features (pictures read), the VAE's posterior (pictures written) and the text tower's
    # states (E(caption), the alignment's target). -> {name: Memo}, their counts to report.
    clip = model.clip
    memos = dict(clip=Memo(clip.image_features, clip.vision_model), vae=Memo(model.vae.encode, model.vae))
    clip.image_features, model.vae.encode = memos["clip"], memos["vae"]
    if clip.config.text is not None:
        memos["text"] = clip.text_hidden_states = Memo(clip.text_hidden_states, clip.text_model)
    return memos
