# Exercise: causal attention with a KV cache (llama.py: KVCache.update, Attention.forward)
import pytest
import torch

import llama
from grading import causal_attention, close, expect, rope_cos_sin, stand_in


@pytest.fixture
def attn(monkeypatch):
    stand_in(monkeypatch, "llama.apply_rope")  # exercise "rope" need not be solved
    torch.manual_seed(0)
    cfg = llama.LlamaConfig(dim=32, n_layers=1, n_heads=4, n_kv_heads=2, vocab_size=16,
                            hidden_dim=64)
    return llama.Attention(cfg, layer=0)


def inputs(T=6, B=2, seed=1):
    x = torch.randn(B, T, 32, generator=torch.Generator().manual_seed(seed))
    return x, rope_cos_sin(torch.arange(T).expand(B, T), 8, 10000.0, torch.float32)


def test_causal_grouped_query_attention(attn):
    x, (cos, sin) = inputs()
    with torch.no_grad():
        got = attn(x, cos, sin, None, None)
        want = causal_attention(attn, x, cos, sin)[0]
    close(got, want, "attention output (B, T, dim): 4 query heads reading 2 key/value heads, "
          "causal")


def test_no_token_sees_the_future(attn):
    x, (cos, sin) = inputs()
    y = x.clone()
    y[:, -1] += 5.0  # change only the last token
    with torch.no_grad():
        a, b = attn(x, cos, sin, None, None), attn(y, cos, sin, None, None)
    close(b[:, :-1], a[:, :-1], "the outputs of tokens 0..T-2 after changing token T-1 (they must "
          "not see it)")


def test_kv_cache_update_appends():
    cache = llama.KVCache(n_layers=2)
    g = torch.Generator().manual_seed(2)
    k1, v1, k2, v2 = (torch.randn(1, 2, n, 4, generator=g) for n in (3, 3, 1, 1))
    cache.update(1, k1, v1)
    k, v = cache.update(1, k2, v2)
    close(k, torch.cat([k1, k2], 2), "keys after two updates: the old ones, then the new")
    close(v, torch.cat([v1, v2], 2), "values after two updates")
    expect(cache.k[1] is not None and cache.k[1].shape[2] == 4,
           "the cache must keep all 4 keys of layer 1 in cache.k[1]")
    expect(cache.k[0] is None, "an update of layer 1 must leave layer 0's keys alone")


def test_decoding_with_the_cache_gives_the_full_sequence_outputs(attn):
    # prefill 3 tokens, then 1 token, then 2 tokens at once (with the mask hidden_states builds)
    x, (cos, sin) = inputs(T=6, B=1, seed=3)
    with torch.no_grad():
        full = causal_attention(attn, x, cos, sin)[0]
        cache = llama.KVCache(1)
        parts = [attn(x[:, :3], cos[:, :, :3], sin[:, :, :3], None, cache),
                 attn(x[:, 3:4], cos[:, :, 3:4], sin[:, :, 3:4], None, cache)]
        mask = (torch.arange(6)[None, :] <= torch.arange(4, 6)[:, None]).expand(1, 1, 2, 6)
        parts.append(attn(x[:, 4:], cos[:, :, 4:], sin[:, :, 4:], mask, cache))
    close(torch.cat(parts, 1), full, "outputs of 3 + 1 + 2 tokens through the KV cache, against "
          "the 6 tokens at once")
    expect(len(cache) == 6, f"the cache holds {len(cache)} tokens after 3 + 1 + 2, not 6")
