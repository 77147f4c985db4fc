"""LLaMA, the decoder DreamLLM builds on (Vicuna-7B is a fine-tuned LLaMA-7B), from scratch.

Module names follow the Hugging Face checkpoints (`model.layers.N.self_attn.q_proj`, ...), so an
official state dict loads with strict=True and no renaming. One block is
    x = x + attention(rmsnorm(x))        causal, rotary positions, grouped-query
    x = x + mlp(rmsnorm(x))              SwiGLU: down(silu(gate(x)) * up(x))
and the model is embed -> N blocks -> rmsnorm -> lm_head.

    model = llama.load("vicuna-7b-v1.1/", dtype=torch.float16)   # a HF folder
    new_tokens = model.generate(input_ids, max_new_tokens=32, eos_id=2)
"""
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from plumbing.checkpoint import CheckpointError, assign, check_types, read_config, read_state_dict, weight_files


@dataclass
class LlamaConfig:
    dim: int = 4096             # hidden_size
    n_layers: int = 32
    n_heads: int = 32           # query heads
    n_kv_heads: int = 32        # key/value heads; fewer than n_heads = grouped-query attention
    vocab_size: int = 32000
    hidden_dim: int = 11008     # intermediate_size, the SwiGLU width
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_seq_len: int = 2048     # max_position_embeddings: what the model was trained on, not enforced
    tie_embeddings: bool = False  # lm_head shares the embedding matrix
    head_dim: int = 0           # 0 means dim // n_heads (the usual case)
    attention_bias: bool = False  # biases on q, k, v, o (LLaMA has none; some derivatives do)
    mlp_bias: bool = False

    def __post_init__(self):
        check_types(self)
        self.head_dim = self.head_dim or self.dim // self.n_heads
        assert self.n_heads % self.n_kv_heads == 0, "each key/value head serves a whole group of query heads"

    @classmethod
    def from_hf(cls, d):
        # transformers 5 writes {"rope_parameters": {...}}, older files "rope_theta" + "rope_scaling".
        rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise ValueError(f"RoPE scaling {kind!r} is not supported, only plain RoPE")
        if d.get("hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {d['hidden_act']!r} is not supported, only silu")
        if d.get("model_type", "llama") != "llama":
            raise ValueError(f"model_type {d['model_type']!r} is not a LLaMA")
        n_heads = d["num_attention_heads"]
        return cls(dim=d["hidden_size"], n_layers=d["num_hidden_layers"], n_heads=n_heads,
                   n_kv_heads=d.get("num_key_value_heads") or n_heads, vocab_size=d["vocab_size"],
                   hidden_dim=d["intermediate_size"], norm_eps=d.get("rms_norm_eps", 1e-6),
                   rope_theta=rope.get("rope_theta", d.get("rope_theta", 10000.0)),
                   max_seq_len=d.get("max_position_embeddings", 2048),
                   tie_embeddings=d.get("tie_word_embeddings", False), head_dim=d.get("head_dim") or 0,
                   attention_bias=d.get("attention_bias", False), mlp_bias=d.get("mlp_bias", False))

    def to_hf(self):  # the config.json of a LlamaForCausalLM with these weights
        return dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_act="silu",
                    hidden_size=self.dim, num_hidden_layers=self.n_layers, num_attention_heads=self.n_heads,
                    num_key_value_heads=self.n_kv_heads, vocab_size=self.vocab_size,
                    intermediate_size=self.hidden_dim, rms_norm_eps=self.norm_eps, rope_theta=self.rope_theta,
                    max_position_embeddings=self.max_seq_len, tie_word_embeddings=self.tie_embeddings,
                    head_dim=self.head_dim, attention_bias=self.attention_bias, mlp_bias=self.mlp_bias)


# The official config.json values. LLaMA-1 (and Vicuna v1.1 fine-tuned from it) used eps 1e-6 and
# 2048 positions; LLaMA-2 (and Vicuna v1.5) 1e-5 and 4096. DreamLLM starts from Vicuna-7B v1.1.
PRESETS = {
    "vicuna-7b-v1.1": LlamaConfig(),
    "vicuna-7b-v1.5": LlamaConfig(norm_eps=1e-5, max_seq_len=4096),
    "llama-2-7b": LlamaConfig(norm_eps=1e-5, max_seq_len=4096),
    # small ones for tests and the classroom (the toy world's tokenizer is tiny)
    "tiny": LlamaConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=256, hidden_dim=172, max_seq_len=512),
    "small": LlamaConfig(dim=256, n_layers=6, n_heads=8, n_kv_heads=4, vocab_size=4096, hidden_dim=688, max_seq_len=1024),
}
PRESETS["vicuna-7b"] = PRESETS["vicuna-7b-v1.1"]


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # x / rms(x), in fp32 even when x is fp16/bf16 (squares overflow fp16); weight applied after casting back
        x32 = x.float()
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)


def rope_cos_sin(positions, head_dim, theta, dtype):
    # Rotary embedding: pair i of a head rotates by angle pos * theta^(-2i/head_dim). Computed in
    # fp32 on every call (cheap) rather than kept as a buffer, so a model built on meta stays complete.
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, device=positions.device).float() / head_dim)
    angles = positions[..., None].float() * inv_freq      # (B, T, head_dim/2)
    angles = torch.cat([angles, angles], dim=-1)           # (B, T, head_dim), HF "rotate half" layout
    return angles.cos().to(dtype)[:, None], angles.sin().to(dtype)[:, None]  # (B, 1, T, head_dim)


def apply_rope(x, cos, sin):
    # In the HF layout, pair i is (x[i], x[i + head_dim/2]), not adjacent elements as in Meta's
    # original code; the HF conversion permuted q_proj/k_proj rows to match, so we need no permutation.
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin   # (x1, x2) -> (x1 cos - x2 sin, x2 cos + x1 sin)


class KVCache:
    # The keys and values of every token seen so far, per layer, each (B, n_kv_heads, S, head_dim).
    # Grown by concatenation: simple, and fast enough for the few hundred tokens DreamLLM writes.
    def __init__(self, n_layers):
        self.k, self.v = [None] * n_layers, [None] * n_layers

    def __len__(self):  # tokens seen so far
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer, k, v):
        if self.k[layer] is not None:
            k, v = torch.cat([self.k[layer], k], dim=2), torch.cat([self.v[layer], v], dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v

    def reorder(self, rows):  # keep these batch rows, in this order (beam search), repeats allowed
        self.k = [k[rows] for k in self.k]
        self.v = [v[rows] for v in self.v]


class StaticKVCache:
    # The same, preallocated for a batch: (B, n_kv_heads, max_len, head_dim) per layer, new tokens
    # written in place. Attention always reads all max_len slots (the unwritten ones are in the
    # future, so the causal mask hides them), and the next free slot is a tensor, `pos`, not a
    # Python int: a decode step then has the same shapes and the same Python values at every token,
    # so torch.compile traces it once and a CUDA graph ("reduce-overhead") replays it per token.
    def __init__(self, cfg, batch_size, max_len, device, dtype):
        shape = (batch_size, cfg.n_kv_heads, max_len, cfg.head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)]
        self.pos = torch.zeros((), dtype=torch.long, device=device)  # tokens written so far
        self.max_len = max_len
        for t in self.k + self.v + [self.pos]:  # fixed addresses: a CUDA graph may write them in place
            torch._dynamo.mark_static_address(t)

    def __len__(self):  # reads the device (a sync on a GPU): for eager code, not inside a compiled step
        return int(self.pos)

    def slots(self, T):  # where T new tokens go: (T,)
        return self.pos + torch.arange(T, device=self.pos.device)

    def update(self, layer, k, v):
        T = k.shape[2]
        if layer == 0 and not torch.compiler.is_compiling() and len(self) + T > self.max_len:
            raise ValueError(f"static KV cache full: {len(self)} + {T} tokens > max_len {self.max_len}")
        slots = self.slots(T)
        self.k[layer].index_copy_(2, slots, k.to(self.k[layer].dtype))
        self.v[layer].index_copy_(2, slots, v.to(self.v[layer].dtype))
        if layer == len(self.k) - 1:  # the last layer has written: these T tokens are cached
            self.pos += T
        return self.k[layer], self.v[layer]


class Attention(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.layer, self.n_heads, self.n_kv_heads, self.head_dim = layer, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.dim, cfg.n_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.dim, cfg.n_kv_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=bias)

    def forward(self, x, cos, sin, mask, cache):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)     # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, k, v)  # (B, n_kv_heads, S, head_dim), S = cached + T
        # softmax(q k^T / sqrt(head_dim)) v; with enable_gqa, query head h reads key/value head
        # h // (n_heads / n_kv_heads), as the checkpoints were trained. No mask = plain causal.
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1,
                                           enable_gqa=self.n_kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))  # heads side by side: (B, T, n_heads * head_dim)


class MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.dim, cfg.hidden_dim, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.hidden_dim, cfg.dim, bias=cfg.mlp_bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg, layer):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.self_attn = Attention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.cfg = cfg
        self.model = nn.Module()  # the extra level only mirrors the checkpoint's "model." prefix
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.model.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.model.norm = RMSNorm(cfg.dim, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        # activation checkpointing: keep only each block's input, recompute its insides in backward
        # (about 1/3 more compute for a fraction of the activation memory); off for inference
        self.gradient_checkpointing = False
        # LLaMA's init: every matrix N(0, 0.02), biases 0, norms 1 (a no-op on the meta device)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif "norm" not in name:
                nn.init.normal_(p, std=0.02)
        self.tie_weights()

    def tie_weights(self):
        if self.cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def new_cache(self, max_len=None, batch_size=1):  # max_len given: a StaticKVCache of that many tokens
        if max_len is None:
            return KVCache(self.cfg.n_layers)
        w = self.model.embed_tokens.weight
        return StaticKVCache(self.cfg, batch_size, max_len, w.device, w.dtype)

    def hidden_states(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        # The final hidden states, after model.norm: (B, T, dim). DreamLLM reads these at the dream
        # query positions; forward() turns them into logits.
        #   attention_mask: (B, keys) of 1 (token) / 0 (padding), padding on the left; keys = cached + T,
        #     or a static cache's max_len (its slots to come count as tokens);
        #   cache: a KVCache or StaticKVCache, filled in place; T new tokens follow the cached ones.
        x = self.model.embed_tokens(input_ids) if inputs_embeds is None else inputs_embeds  # (B, T, dim)
        B, T, _ = x.shape
        if isinstance(cache, StaticKVCache):
            q_pos, n_keys = cache.slots(T), cache.max_len  # keys: all its slots, written or not
        else:
            past = len(cache) if cache is not None else 0
            q_pos, n_keys = torch.arange(past, past + T, device=x.device), past + T
        if attention_mask is None:
            positions = q_pos.expand(B, T)
        else:
            if attention_mask.shape != (B, n_keys):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, must be (B, keys) = {(B, n_keys)}")
            # A left-padded row's first real token is position 0, as if it ran alone (as HF generate does).
            positions = (attention_mask.long().cumsum(-1) - 1).clamp(min=0).index_select(1, q_pos)  # (B, T)
        mask = None  # no padding, nothing cached: SDPA's built-in causal mask
        if attention_mask is not None or n_keys > T or isinstance(cache, StaticKVCache):
            k_pos = torch.arange(n_keys, device=x.device)[None, :]    # (1, keys)
            mask = (k_pos <= q_pos[:, None]).expand(B, 1, T, n_keys)  # causal: (B, 1, T, keys), True = attend
            if attention_mask is not None:
                # never attend to padding, but let each token see itself, so that a padding query
                # keeps one key (an all-masked softmax row is NaN); its output is never read
                mask = (mask & attention_mask.bool()[:, None, None, :]) | (k_pos == q_pos[:, None])
        cos, sin = rope_cos_sin(positions, self.cfg.head_dim, self.cfg.rope_theta, x.dtype)
        for layer in self.model.layers:
            if self.gradient_checkpointing and torch.is_grad_enabled() and cache is None:
                x = checkpoint(layer, x, cos, sin, mask, None, use_reentrant=False)
            else:
                x = layer(x, cos, sin, mask, cache)
        return self.model.norm(x)

    def forward(self, input_ids=None, inputs_embeds=None, attention_mask=None, cache=None):
        return self.lm_head(self.hidden_states(input_ids, inputs_embeds, attention_mask, cache))  # (B, T, vocab)

    @torch.no_grad()
    def generate(self, input_ids=None, max_new_tokens=32, attention_mask=None, inputs_embeds=None,
                 temperature=0.0, top_p=1.0, eos_id=None, generator=None, static_cache=False, cache=None):
        # Returns only the new tokens, (B, <= max_new_tokens). temperature 0 = greedy. Rows that have
        # written eos_id keep writing it; generation stops when every row has. static_cache: a
        # StaticKVCache of T + max_new_tokens slots, the same tokens; for speed on a GPU, with
        #     model.compile(mode="reduce-overhead", fullgraph=True)   # one CUDA graph per decode step
        # cache: a StaticKVCache to reuse from call to call (emptied first): the same addresses every
        # time, so the CUDA graphs recorded for the first call serve the next ones too.
        prompt = input_ids if input_ids is not None else inputs_embeds
        B, T = prompt.shape[:2]
        if attention_mask is None:
            attention_mask = torch.ones(B, T, dtype=torch.long, device=prompt.device)
        if max_new_tokens <= 0:
            return prompt.new_zeros(B, 0, dtype=torch.long)
        static_cache = static_cache or cache is not None
        if static_cache:  # one mask for every step, so that each decode step sees the same shapes
            cache = cache if cache is not None else self.new_cache(T + max_new_tokens, B)
            if T + max_new_tokens > cache.max_len:
                raise ValueError(f"{T} + {max_new_tokens} tokens do not fit the cache's max_len {cache.max_len}")
            cache.pos.zero_()  # empty: old keys past the prompt count as the future until overwritten
            attention_mask = F.pad(attention_mask, (0, cache.max_len - T), value=1)
        else:
            cache = KVCache(self.cfg.n_layers)
        out = []
        done = torch.zeros(B, dtype=torch.bool, device=prompt.device)
        logits = self(input_ids, inputs_embeds, attention_mask, cache)[:, -1]  # prefill: (B, vocab)
        for _ in range(max_new_tokens):
            token = sample(logits, temperature, top_p, generator)            # (B,)
            if eos_id is not None:
                token = token.masked_fill(done, eos_id)
                done |= token == eos_id
            out.append(token)
            if len(out) == max_new_tokens or done.all():
                break
            if not static_cache:
                attention_mask = torch.cat([attention_mask, attention_mask.new_ones(B, 1)], dim=1)
            logits = self(token[:, None], attention_mask=attention_mask, cache=cache)[:, -1]
        return torch.stack(out, dim=1)

    @torch.no_grad()
    def beam_search(self, inputs_embeds, beams, max_new_tokens, eos_id, banned=(), length_penalty=1.0):
        # The release's answers: transformers 4.35.2's generate(num_beams=beams), which it pins.
        # Each step keeps the `beams` best running continuations of the prompt (1, P, D) by their
        # summed log-probability; a candidate ending in eos_id among the step's `beams` best is a
        # finished hypothesis, scored sum / length ** length_penalty, where the length is the whole
        # sequence's without the EOS, the prompt's P included (4.36 and later count the generated
        # tokens alone: a short answer after a long prompt wins more often here).
        # -> the best hypothesis's tokens, without the EOS.
        def logprobs(h):  # (n, vocab): log_softmax, then the banned tokens impossible (HF's order)
            return F.log_softmax(self.lm_head(h).float(), -1).index_fill(-1, banned, float("-inf"))

        def add(score, tokens):  # the `beams` best finished hypotheses are kept, as HF keeps them:
            score = score / (P + len(tokens)) ** length_penalty  # one no better than the worst is
            if len(ended) < beams or score > min(s for s, _ in ended):  # not; of tied worst, the
                ended.append((score, tokens))                            # oldest goes
                if len(ended) > beams:
                    del ended[min(range(len(ended)), key=lambda i: (ended[i][0], i))]
        banned = torch.tensor(list(banned), dtype=torch.long, device=inputs_embeds.device)
        P, cache = inputs_embeds.shape[1], KVCache(self.cfg.n_layers)
        logp = logprobs(self.hidden_states(inputs_embeds=inputs_embeds, cache=cache)[:, -1])
        seqs, scores, ended, done = [[]], logp.new_zeros(1), [], False
        for step in range(max_new_tokens):
            V = logp.shape[-1]
            top, index = (scores[:, None] + logp).flatten().topk(min(2 * beams, logp.numel()))
            rows, tokens, kept = [], [], []
            for rank, (s, i) in enumerate(zip(top.tolist(), index.tolist())):
                row, token = divmod(i, V)
                if token == eos_id:
                    if rank < beams:  # an EOS ranked below the running beams is dropped
                        add(s, seqs[row])
                elif len(rows) < beams:
                    rows, tokens, kept = rows + [row], tokens + [token], kept + [s]
                if len(rows) == beams:
                    break
            seqs, scores = [seqs[r] + [t] for r, t in zip(rows, tokens)], logp.new_tensor(kept)
            # done (early_stopping=False) when `beams` have ended and the worst of them beats what
            # the step's best candidate would score at the current whole length
            done = len(ended) == beams and \
                min(s for s, _ in ended) >= top[0].item() / (P + step + 1) ** length_penalty
            if done or step + 1 == max_new_tokens:
                break
            cache.reorder(torch.tensor(rows, device=logp.device))
            logp = logprobs(self.hidden_states(torch.tensor(tokens, device=logp.device)[:, None],
                                               cache=cache)[:, -1])
        for s, q in zip(scores.tolist(), seqs) if not done else ():  # cut at max_new_tokens
            add(s, q)
        return ended[max(range(len(ended)), key=lambda i: (ended[i][0], i))][1]  # of tied, the newest


def sample(logits, temperature=0.0, top_p=1.0, generator=None):
    # logits (B, vocab) -> tokens (B,). Top-p (nucleus): keep the most likely tokens until their
    # mass reaches top_p, and draw among those.
    if temperature == 0:
        return logits.argmax(-1)
    probs = F.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        mass_before = sorted_probs.cumsum(-1) - sorted_probs  # the most likely token always stays
        sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    # drawn where the generator is (a CPU one: the same text on any device); renormalizes by itself
    on = generator.device if generator is not None else probs.device
    return torch.multinomial(probs.to(on), 1, generator=generator).squeeze(-1).to(probs.device)


def build(config) -> Llama:
    # config: a HF config.json dict, a preset name, or a LlamaConfig. Random init; under
    # `with torch.device("meta")` it allocates nothing.
    if isinstance(config, str):
        config = PRESETS[config]
    elif isinstance(config, dict):
        config = LlamaConfig.from_hf(config)
    return Llama(replace(config))  # a copy, so the presets are never mutated


def load(path, device="cpu", dtype=torch.float32) -> Llama:
    # A HF folder: config.json beside model.safetensors, its shards, or pytorch_model.bin (+ shards).
    folder = Path(path)
    try:
        cfg = LlamaConfig.from_hf(read_config(folder))
    except KeyError as e:
        raise CheckpointError(f"{folder / 'config.json'}: has no {e}, not a LLaMA config") from None
    except (ValueError, TypeError, AssertionError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: {e}") from None
    files = weight_files(folder, ["model.safetensors", "pytorch_model.bin"])
    state = read_state_dict(files, dtype=dtype, device=device)
    if cfg.tie_embeddings and "model.embed_tokens.weight" in state:
        state.setdefault("lm_head.weight", state["model.embed_tokens.weight"])  # tied files omit it
    with torch.device("meta"):
        model = Llama(cfg)
    source = files[0] if len(files) == 1 else f"{folder} ({len(files)} shards)"
    # old checkpoints carry the RoPE frequencies as a buffer; we compute them instead
    assign(model, state, source, ignore=[r"rotary_emb\.inv_freq$"])
    model.tie_weights()  # assignment gave lm_head its own Parameter; share the embedding's again
    return model.eval()
