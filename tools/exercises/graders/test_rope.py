# Exercise: rotary position embeddings (llama.py: rope_cos_sin, apply_rope)
import torch

import llama
from grading import apply_rope, close, expect, rope_cos_sin


def positions(B=2, T=7, start=0):
    return torch.arange(start, start + T).expand(B, T)


def test_cos_sin_hold_each_angle_twice():
    pos = positions(start=3)
    cos, sin = llama.rope_cos_sin(pos, 16, 10000.0, torch.float32)
    want_cos, want_sin = rope_cos_sin(pos, 16, 10000.0, torch.float32)
    close(cos, want_cos, "cos: cos(pos * theta^(-2i/head_dim)) for i < head_dim/2, laid out twice")
    close(sin, want_sin, "sin: likewise")


def test_cos_sin_other_theta_and_dtype():
    pos = torch.tensor([[0, 5, 40], [2, 2, 9]])
    cos, sin = llama.rope_cos_sin(pos, 8, 500.0, torch.float64)
    expect(cos.dtype == torch.float64, f"rope_cos_sin(..., dtype=float64): got {cos.dtype}")
    want_cos, want_sin = rope_cos_sin(pos, 8, 500.0, torch.float64)
    close(cos, want_cos, "cos with theta 500 and uneven positions")
    close(sin, want_sin, "sin with theta 500 and uneven positions")


def test_apply_rope_turns_the_pairs():
    x = torch.randn(2, 3, 7, 16, generator=torch.Generator().manual_seed(0))
    cos, sin = rope_cos_sin(positions(start=1), 16, 10000.0, torch.float32)
    close(llama.apply_rope(x, cos, sin), apply_rope(x, cos, sin),
          "apply_rope: pair (x_i, x_(i+d/2)) -> (x_i cos - x_(i+d/2) sin, x_(i+d/2) cos + x_i sin)")


def test_scores_depend_only_on_the_distance():
    # q at position m, k at position n: q . k after rotation depends on m - n only
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(1, 1, 1, 32, generator=g), torch.randn(1, 1, 1, 32, generator=g)

    def score(m, n):
        cq, sq = llama.rope_cos_sin(torch.tensor([[m]]), 32, 10000.0, torch.float32)
        ck, sk = llama.rope_cos_sin(torch.tensor([[n]]), 32, 10000.0, torch.float32)
        return (llama.apply_rope(q, cq, sq) * llama.apply_rope(k, ck, sk)).sum()
    close(score(9, 4), score(5, 0), "q.k at positions (9, 4) against (5, 0): the same distance",
          atol=1e-4)
    expect(abs(score(9, 4) - score(4, 4)) > 1e-3, "q.k at distance 5 equals q.k at distance 0: "
           "the rotation does not depend on the position")
