# llama.py against Hugging Face transformers (the reference, test-only) on small random models
# saved in the official layouts, fp32 on CPU. Run with -s to see the measured parity figures.
import itertools
import json
import math

import pytest
import torch
import torch.nn.functional as F
import transformers
from safetensors.torch import load_file

import llama
from plumbing.checkpoint import CheckpointError

TOL = 1e-4  # max |ours - reference| / max |reference|


def rel_diff(ours, ref):
    return ((ours - ref).abs().max() / ref.abs().max()).item()


def hf_model(seed=0, **overrides):
    # A small random LlamaForCausalLM. Matrices get std 0.15 (not 0.02) so that a wrong formula moves
    # the logits visibly; the embedding stays small (std 0.02, as in real models) so that the first
    # RMSNorm's eps matters; norm weights are not all ones, so a norm that forgets its weight shows.
    torch.manual_seed(seed)
    cfg = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=4, rms_norm_eps=1e-6, rope_theta=10000.0,
               max_position_embeddings=256, tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    cfg.update(overrides)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**cfg)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(std=0.02 if "embed_tokens" in name else 0.15)
    return model


def save_bin(model, folder):
    # transformers 5 always writes safetensors, so write an old-style pytorch_model.bin by hand, with
    # the rotary_emb.inv_freq buffers that checkpoints from transformers < 4.31 carry.
    model.save_pretrained(folder)
    state = load_file(folder / "model.safetensors")
    (folder / "model.safetensors").unlink()
    for i in range(model.config.num_hidden_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(model.config.head_dim // 2)
    torch.save(state, folder / "pytorch_model.bin")


CASES = {  # name: (HF config overrides, how the folder is written)
    "mha": (dict(), "single"),
    "gqa-theta5e5-eps1e-5": (dict(num_key_value_heads=2, rope_theta=500000.0, rms_norm_eps=1e-5), "sharded"),
    "tied-eps1e-5": (dict(tie_word_embeddings=True, rms_norm_eps=1e-5), "bin"),
    "mqa-headdim32-bias": (dict(num_key_value_heads=1, head_dim=32, attention_bias=True, mlp_bias=True), "single"),
}


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_transformers(case, tmp_path):
    overrides, layout = CASES[case]
    ref = hf_model(**overrides)
    if layout == "bin":
        save_bin(ref, tmp_path)
    else:
        ref.save_pretrained(tmp_path, max_shard_size="40KB" if layout == "sharded" else "50GB")
    weights = sorted(p.name for p in tmp_path.iterdir() if "model" in p.name)
    assert (len(weights) > 2) == (layout == "sharded"), weights

    ours = llama.load(tmp_path)
    torch.manual_seed(1)
    ids = torch.randint(0, 128, (2, 16))
    embeds = 0.05 * torch.randn(2, 16, 64)
    with torch.no_grad():
        figures = {
            "logits": rel_diff(ours(ids), ref(ids).logits),
            "hidden": rel_diff(ours.hidden_states(ids), ref.model(ids).last_hidden_state),
            "inputs_embeds": rel_diff(ours(inputs_embeds=embeds), ref(inputs_embeds=embeds).logits),
        }
        scale = ref(ids).logits.abs().max().item()
    print(f"\nparity[{case}] max|diff|/max|ref|: " + "  ".join(f"{k} {v:.1e}" for k, v in figures.items())
          + f"  (max|ref logits| {scale:.1f})")
    assert all(v <= TOL for v in figures.values()), figures
    assert (ours.lm_head.weight is ours.model.embed_tokens.weight) == overrides.get("tie_word_embeddings", False)

    half = llama.load(tmp_path, dtype=torch.bfloat16)  # the dtype argument casts every weight
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    with torch.no_grad():
        assert rel_diff(half(ids).float(), ref(ids).logits) < 0.1


def test_kv_cache_equals_full_forward():
    torch.manual_seed(0)
    model = llama.build("tiny").eval()
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache()
        steps = [model(ids[:, :5], cache=cache)]  # a prompt of 5, then one token at a time
        steps += [model(ids[:, t:t + 1], cache=cache) for t in range(5, 12)]
    assert len(cache) == 12
    assert rel_diff(torch.cat(steps, dim=1), full) <= 1e-5
    # DreamLLM prompts are embeddings (image features spliced in): generation must accept them
    embeds = model.model.embed_tokens(ids)
    assert model.generate(inputs_embeds=embeds, max_new_tokens=5).tolist() == model.generate(ids, 5).tolist()


def left_pad(rows, pad=0):
    T = max(map(len, rows))
    ids = torch.tensor([[pad] * (T - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (T - len(r)) + [1] * len(r) for r in rows])
    return ids, mask


def test_left_padded_batch_equals_rows_alone():
    torch.manual_seed(0)
    model = llama.build("tiny").eval()
    rows = [torch.randint(3, 256, (n,)).tolist() for n in (7, 3, 10)]
    ids, mask = left_pad(rows)
    with torch.no_grad():
        batch = model(ids, attention_mask=mask)
        gen = model.generate(ids, max_new_tokens=6, attention_mask=mask)
        for i, row in enumerate(rows):
            alone = model(torch.tensor([row]))
            assert rel_diff(batch[i, -len(row):], alone[0]) <= 1e-5
            assert gen[i].tolist() == model.generate(torch.tensor([row]), max_new_tokens=6)[0].tolist()
    assert torch.isfinite(batch).all()  # padding queries must not turn into NaN


@pytest.mark.parametrize("padded", [False, True])
def test_greedy_generate_equals_transformers(padded, tmp_path):
    ref = hf_model(num_key_value_heads=2)
    ref.save_pretrained(tmp_path)
    ours = llama.load(tmp_path)
    torch.manual_seed(2)
    rows = [torch.randint(3, 128, (n,)).tolist() for n in ((9, 5) if padded else (8, 8))]
    ids, mask = left_pad(rows)
    # stop on a token row 0 really writes, so the eos handling is exercised too
    eos = ours.generate(ids, max_new_tokens=12, attention_mask=mask)[0, 3].item()
    new = ours.generate(ids, max_new_tokens=12, attention_mask=mask, eos_id=eos)
    expected = ref.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False,
                            eos_token_id=eos, pad_token_id=eos)[:, ids.shape[1]:]
    assert new.tolist() == expected.tolist()
    assert new[0, 3:].eq(eos).all()


def test_sampling_top_p_and_generator():
    torch.manual_seed(0)
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log().repeat(2000, 1)
    tokens = llama.sample(logits, temperature=1.0, top_p=0.7)
    assert set(tokens.tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.7; 0.15 and 0.05 are cut
    share = tokens.eq(0).float().mean().item()
    assert abs(share - 0.5 / 0.8) < 0.05  # renormalized within the nucleus
    assert set(llama.sample(logits, temperature=1.0).tolist()) == {0, 1, 2, 3}

    model = llama.build("tiny").eval()
    ids = torch.randint(0, 256, (2, 5))
    run = lambda seed, **kw: model.generate(ids, 8, temperature=0.8, top_p=0.9,
                                            generator=torch.Generator().manual_seed(seed), **kw)
    assert run(7).tolist() == run(7).tolist()
    assert model.generate(ids, 8, temperature=1.0, top_p=1e-6).tolist() == model.generate(ids, 8).tolist()


# The official config.json files (lmsys/vicuna-7b-v1.1, lmsys/vicuna-7b-v1.5, meta-llama/Llama-2-7b-hf),
# the fields that matter.
LLAMA_7B = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
                num_attention_heads=32, hidden_act="silu", tie_word_embeddings=False, model_type="llama")
OFFICIAL = {
    "vicuna-7b-v1.1": dict(LLAMA_7B, max_position_embeddings=2048, rms_norm_eps=1e-6),
    "vicuna-7b-v1.5": dict(LLAMA_7B, max_position_embeddings=4096, rms_norm_eps=1e-5, num_key_value_heads=32,
                           rope_theta=10000.0, rope_scaling=None),
    "llama-2-7b": dict(LLAMA_7B, max_position_embeddings=4096, rms_norm_eps=1e-5, num_key_value_heads=32,
                       rope_theta=10000.0, rope_scaling=None),
}


@pytest.mark.parametrize("name", OFFICIAL)
def test_full_size_presets_have_reference_keys_and_shapes(name):
    assert llama.LlamaConfig.from_hf(OFFICIAL[name]) == llama.PRESETS[name]
    with torch.device("meta"):
        ours = llama.build(name)
        ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**OFFICIAL[name]))
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}
    assert shapes(ours) == shapes(ref)
    assert sum(p.numel() for p in ours.parameters()) == 6_738_415_616  # "LLaMA-7B"


def test_tiny_presets_have_reference_keys():
    for name in ("tiny", "small"):
        cfg = llama.PRESETS[name]
        hf = dict(vocab_size=cfg.vocab_size, hidden_size=cfg.dim, intermediate_size=cfg.hidden_dim,
                  num_hidden_layers=cfg.n_layers, num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.n_kv_heads)
        with torch.device("meta"):
            ref = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf))
        assert {k: v.shape for k, v in llama.build(name).state_dict().items()} == \
               {k: v.shape for k, v in ref.state_dict().items()}


def one_line_error(path):
    with pytest.raises(CheckpointError) as e:
        llama.load(path)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_bad_folders(tmp_path):
    assert "no such folder" in one_line_error(tmp_path / "nowhere")
    assert f"{tmp_path / 'config.json'}: missing" in one_line_error(tmp_path)

    hf_model().save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    message = one_line_error(tmp_path)
    assert str(weights) in message and "truncated" in message

    weights.write_bytes(data)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, intermediate_size=128)))
    message = one_line_error(tmp_path)
    assert str(weights) in message and "model.layers.0.mlp.up_proj.weight [96, 64] != [128, 64]" in message

    (tmp_path / "config.json").write_text(json.dumps(dict(config, rope_parameters=None,
                                                          rope_scaling=dict(type="linear", factor=2.0))))
    message = one_line_error(tmp_path)
    assert "config.json" in message and "'linear'" in message


def test_beam_search_finds_the_best_continuation():
    torch.manual_seed(0)
    model = llama.build(llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=6,
                                          hidden_dim=64)).eval()
    prompt = model.model.embed_tokens(torch.tensor([[1, 4, 2]]))

    def logprob(seq):  # the model's log-probability of `seq` after the prompt
        ids = torch.tensor([[1, 4, 2] + seq])
        logp = torch.log_softmax(model(ids)[0, 2:-1].float(), -1)
        return logp.gather(-1, torch.tensor(seq)[:, None]).sum().item()
    with torch.no_grad():
        # one beam is greedy decoding
        greedy = model.generate(inputs_embeds=prompt, max_new_tokens=3)[0].tolist()
        assert model.beam_search(prompt, 1, 3, eos_id=-1) == greedy
        # enough beams to keep every prefix: the best of all 6^3 continuations, exactly
        best = max(itertools.product(range(6), repeat=3), key=lambda s: logprob(list(s)))
        assert model.beam_search(prompt, 36, 3, eos_id=-1) == list(best)
        three = model.beam_search(prompt, 3, 3, eos_id=-1)
        assert logprob(three) >= logprob(greedy) - 1e-6
        # a banned token is never written
        assert 5 not in model.beam_search(prompt, 3, 4, eos_id=0, banned=[5])


def test_beam_scores_count_the_prompt_as_transformers_4_35_2_does():
    # A chain whose next token depends on the last one alone: the model's states are one-hot of
    # it (the prompt's: START). From START, "a" (-1.0) then EOS; or b1 (-2.0), then b2 ... b5 and
    # EOS surely; or "c" (the rest), after which every token is as likely. A = [a] sums -1.0 over
    # 1 token, B = [b1..b5] -2.0 over 5. Normalised by the whole length, as the release's pinned
    # transformers does, A wins after a 10-token prompt (-1/11 > -2/15), B after a 1-token one
    # (-1/2 < -2/6); by the generated length alone (transformers >= 4.36), B would win both.
    EOS, A, C, START, V = 0, 1, 7, 8, 8
    model = llama.build(llama.LlamaConfig(dim=16, n_layers=1, n_heads=2, n_kv_heads=2, vocab_size=V,
                                          hidden_dim=32)).eval()
    table = torch.full((V, 16), -30.0)  # table[:, state] = the next token's logits in that state
    table[A, START], table[2, START], table[C, START] = -1.0, -2.0, math.log(1 - math.exp(-1) - math.exp(-2))
    table[EOS, A] = 0.0
    for b in range(2, 7):
        table[b + 1 if b < 6 else EOS, b] = 0.0
    table[:, C] = 0.0
    model.lm_head.weight.data = table

    def one_hot(input_ids=None, inputs_embeds=None, cache=None):
        states = torch.full(inputs_embeds.shape[:2], START) if input_ids is None else input_ids
        h = F.one_hot(states, 16).float()
        cache.update(0, h[:, None], h[:, None])  # so that the cache's rows follow the beams
        return h
    model.hidden_states = one_hot
    assert model.beam_search(torch.zeros(1, 10, 16), 3, 8, eos_id=EOS) == [A]
    assert model.beam_search(torch.zeros(1, 1, 16), 3, 8, eos_id=EOS) == [2, 3, 4, 5, 6]
