# Exercise: the UNet's cross-attention (unet.py: Attention.forward, TransformerBlock.forward)
import math

import torch
import torch.nn as nn

import unet
from grading import close, expect


def heads_attention(q, k, v, n):  # (B, T, C), (B, S, C), (B, S, C) -> (B, T, C), n heads
    B, T, C = q.shape
    d = C // n
    q, k, v = (x.reshape(B, -1, n, d).transpose(1, 2) for x in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(d)).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(B, T, C)


def attention_layer(seed=0, dim=32, context_dim=24, heads=4):
    torch.manual_seed(seed)
    return unet.Attention(dim, context_dim, heads, upcast=False)


def test_cross_attention_reads_the_context():
    a = attention_layer()
    g = torch.Generator().manual_seed(1)
    x, ctx = torch.randn(2, 10, 32, generator=g), torch.randn(2, 6, 24, generator=g)
    want = a.to_out[0](heads_attention(a.to_q(x), a.to_k(ctx), a.to_v(ctx), 4))
    with torch.no_grad():
        close(a(x, ctx), want, "cross-attention: queries from the pixels x (2, 10, 32), keys and "
              "values from the context (2, 6, 24), 4 heads")


def test_self_attention_without_context():
    a = attention_layer(dim=32, context_dim=32)
    x = torch.randn(1, 9, 32, generator=torch.Generator().manual_seed(2))
    want = a.to_out[0](heads_attention(a.to_q(x), a.to_k(x), a.to_v(x), 4))
    with torch.no_grad():
        close(a(x), want, "self-attention (context None): keys and values from x itself")


def test_the_context_is_a_set():
    # no positions on the context: permuting its tokens changes nothing
    a = attention_layer()
    g = torch.Generator().manual_seed(3)
    x, ctx = torch.randn(1, 5, 32, generator=g), torch.randn(1, 6, 24, generator=g)
    with torch.no_grad():
        close(a(x, ctx[:, [5, 3, 1, 0, 2, 4]]), a(x, ctx), "the output with the context's tokens "
              "permuted", atol=1e-5)
        expect(not torch.allclose(a(x, ctx), a(x, ctx * 2)),
               "the output does not depend on the context")


class Scale(nn.Module):
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return self.k * x


class FakeAttention(nn.Module):  # x -> tanh(x) (self) or x * mean(context) (cross)
    def __init__(self, cross):
        super().__init__()
        self.cross = cross

    def forward(self, x, context=None):
        expect((context is not None) == self.cross,
               "attn1 attends to the pixels alone (no context); attn2 to the context")
        return x * context.mean() if self.cross else torch.tanh(x)


def test_transformer_block():
    b = unet.TransformerBlock(16, 8, 2, False)
    b.norm1, b.norm2, b.norm3 = Scale(2.0), Scale(3.0), Scale(0.5)
    b.attn1, b.attn2 = FakeAttention(False), FakeAttention(True)
    b.ff = Scale(-1.5)
    g = torch.Generator().manual_seed(4)
    x, ctx = torch.randn(2, 7, 16, generator=g), torch.rand(2, 3, 8, generator=g) + 1
    h = x + torch.tanh(2.0 * x)
    h = h + 3.0 * h * ctx.mean()
    want = h - 1.5 * 0.5 * h
    close(b(x, ctx), want, "x + attn1(norm1 x), + attn2(norm2 ., context), + ff(norm3 .), with "
          "stand-ins norm = k x, attn1 = tanh, attn2 = x mean(context), ff = -1.5 x")
