"""The objective DreamLLM argues against: alignment, as GILL, Emu and NExT-GPT train their LLM to draw.

DreamLLM's condition c is learned through the diffusion model's own score (score distillation:
SD's denoising loss, the UNet frozen). The peers instead regress the LLM's output onto what the
frozen text encoder says of the same caption, E(caption), the sequence of L token states the UNet
was trained on, and never run the UNet in training:

    align = |M(c) - E(caption)|^2            (or 1 - cos, token by token)

The paper's argument (sec. 2.1): E(caption) is a bottleneck, only what the caption says reaches
the picture. In the shapes world the UNet was trained on the toy CLIP's text states
(weights/train_toy.py), so both objectives can be trained on the same pairs and judged by the same
benchmark: `python -m tools.sweep objective`.

The bridge. c is K query states, E(caption) is L token states (toy: 8 against 32): the two cannot
be compared as they are. GILL maps its [IMG] states to the text encoder's 77 with a small
transformer whose L learned queries attend to them; Mapper below is that, two blocks deep. To keep
the UNet's input the same under both objectives, a model built with bridge="mapper" conditions the
UNet on M(c), (L, C), whichever objective trains it; the released DreamLLM has no mapper and feeds
the UNet its K projected states (bridge="projector").

The tokenizer: E reads the LLM's tokenizer's ids, true in the shapes world, where one tokenizer
serves both (weights/train_toy.py); SD's real text encoder has its own, which we do not ship.
"""
import torch
import torch.nn.functional as F
from torch import nn

DISTANCES = ("mse", "cosine")


class Block(nn.Module):  # pre-norm: the queries attend to the states, then think alone (an MLP)
    def __init__(self, width, n_heads):
        super().__init__()
        self.norm_q, self.norm_kv, self.norm_mlp = (nn.LayerNorm(width) for _ in range(3))
        self.attn = nn.MultiheadAttention(width, n_heads, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))

    def forward(self, x, states):  # x (n, L, C) attends to states (n, K, C)
        kv = self.norm_kv(states)
        x = x + self.attn(self.norm_q(x), kv, kv, need_weights=False)[0]
        return x + self.mlp(self.norm_mlp(x))


class Mapper(nn.Module):
    # GILL's bridge, small: (n, K, C) the projected query states -> (n, L, C), the shape of the text
    # encoder's states. It ends with a LayerNorm, as the text encoder does (its final_layer_norm).
    def __init__(self, width, length, n_heads=4, depth=2):
        super().__init__()
        self.queries = nn.Parameter(torch.randn(length, width) * 0.02)  # one per text position
        self.blocks = nn.ModuleList(Block(width, n_heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width)

    def forward(self, states):
        x = self.queries.to(states.dtype).expand(len(states), -1, -1)
        for block in self.blocks:
            x = block(x, states)
        return self.norm(x)


def text_ids(tokenizer, captions, length):
    # CLIP's input: <s> caption </s>, right-padded to the text tower's `length` positions with
    # <pad> (</s> where the tokenizer has none, as SD's CLIP pads); the tower is causal, so no
    # caption token sees the padding. (n,) captions -> (n, length) ids
    bos, eos = tokenizer.token_to_id("<s>"), tokenizer.token_to_id("</s>")
    pad = tokenizer.token_to_id("<pad>")
    pad = eos if pad is None else pad
    rows = [[bos] + tokenizer.encode(c, add_special_tokens=False).ids[:length - 2] + [eos]
            for c in captions]
    return torch.tensor([r + [pad] * (length - len(r)) for r in rows])


def distance(prediction, target, kind="mse"):
    # (n, L, C) each -> a scalar: the mean squared error, or the mean of 1 - cos over token states
    if kind == "mse":
        return F.mse_loss(prediction.float(), target.float())
    if kind == "cosine":
        return (1 - F.cosine_similarity(prediction.float(), target.float(), dim=-1)).mean()
    raise ValueError(f"alignment distance {kind!r}: one of {DISTANCES}")
