# Exercise: the SwiGLU MLP and the pre-norm block (llama.py: MLP.forward, Block.forward)
import torch
import torch.nn as nn
import torch.nn.functional as F

import llama
from grading import close, expect, stand_in

CFG = llama.LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16, hidden_dim=48)


def test_swiglu():
    torch.manual_seed(0)
    mlp = llama.MLP(CFG)
    x = torch.randn(2, 5, 32)
    gate, up = x @ mlp.gate_proj.weight.T, x @ mlp.up_proj.weight.T
    want = (gate * torch.sigmoid(gate) * up) @ mlp.down_proj.weight.T
    with torch.no_grad():
        close(mlp(x), want, "down(silu(gate(x)) * up(x))")


class Scale(nn.Module):  # stands in for a norm: x -> k x
    def __init__(self, k):
        super().__init__()
        self.k = k

    def forward(self, x):
        return self.k * x


class FakeAttention(nn.Module):  # stands in for attention; checks what it is given
    def forward(self, x, cos, sin, mask, cache):
        expect(cos == "cos" and sin == "sin" and mask == "mask" and cache == "cache",
               "Block.forward must hand cos, sin, mask and cache to self_attn as it got them")
        return torch.sin(x)


class FakeMLP(nn.Module):
    def forward(self, x):
        return 0.1 * x ** 2


def test_pre_norm_residual_block():
    block = llama.Block(CFG, 0)
    block.input_layernorm, block.post_attention_layernorm = Scale(2.0), Scale(3.0)
    block.self_attn, block.mlp = FakeAttention(), FakeMLP()
    x = torch.randn(2, 5, 32, generator=torch.Generator().manual_seed(1))
    h = x + torch.sin(2.0 * x)
    want = h + 0.1 * (3.0 * h) ** 2
    close(block(x, "cos", "sin", "mask", "cache"), want,
          "x + attn(norm1(x)), then + mlp(norm2(.)), with norm1 = 2x, attn = sin, norm2 = 3x, "
          "mlp = 0.1 x^2")


def test_block_in_a_real_layer(monkeypatch):
    stand_in(monkeypatch, "RMSNorm.forward")  # exercise "rmsnorm" need not be solved
    torch.manual_seed(2)
    block = llama.Block(CFG, 0)
    block.self_attn = FakeAttention()
    x = torch.randn(1, 4, 32)
    n1, n2 = block.input_layernorm, block.post_attention_layernorm

    def rms(m, v):
        return m.weight * v / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + m.eps)
    h = x + torch.sin(rms(n1, x))
    m = block.mlp
    u = rms(n2, h)
    want = h + m.down_proj(F.silu(m.gate_proj(u)) * m.up_proj(u))
    with torch.no_grad():
        close(block(x, "cos", "sin", "mask", "cache"), want,
              "a block with its own RMSNorms and MLP")
