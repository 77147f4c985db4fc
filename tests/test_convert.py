# weights/convert.py. The tokenizer: a SentencePiece BPE model trained here with LLaMA's settings
# (byte fallback, identity normalization, dummy prefix, digits split), converted by our hand-written
# reader, must give sentencepiece's own ids (and transformers' LlamaTokenizer's) on a varied corpus and
# on thousands of random strings, added DreamLLM tokens included. The weights: a tiny random LLaMA saved
# as official-style .bin shards must load from the safetensors we write exactly as from the .bin.
import json
import random
import re

import pytest
import sentencepiece as spm
import torch
from tokenizers import Tokenizer

import llama
from weights import convert

WORDS = ("the quick brown fox jumps over a lazy dog while dream images patch their start and end; models "
         "of language learn tokens pieces merges scores bytes fallback unicode spaces newlines hello world "
         "python torch tensors DreamLLM writes images and reads them").split()
CORPUS = [
    "Hello world", "the quick brown fox jumps over the lazy dog.", " leading space", "   three leading",
    "trailing spaces   ", "runs   of    spaces", "new\nlines\n\nand\r\nreturns\n", "tabs\tand\ttabs",
    "digits 1234567890, 3.14159 and -42", "punctuation: !?.,;:'\"()[]{}<>@#$%^&*_-+=/\\|`~",
    "café naïve Héllo wörld façade", "日本語のテキストです", "中文文本测试 with English", "한국어 텍스트",
    "emoji 😀🎉👩‍💻 done", "Ω ≈ ∑ ∞ → ½ ẞ ǅ", "", " ", "\n", "a" * 40, "x = f(y) + 3 * 42; print(x)",
    "dreamllm DreamLLM DREAMLLM", "tokenization­soft­hyphen", "zero\u200bwidth", "<s> and </s> in text",
]
# DreamLLM's added_tokens.json, in the official order of ids (32000... in the real file)
ADDED_ORDER = ["[PAD]", "<im_start>", "<dream_end>", "<dream_start>", "<im_patch>", "<im_end>", "<image>", "<dream>"]
DREAMLLM_TEXT = [
    "USER: <image>\nWhat is in this picture? ASSISTANT:", "a red circle<dream_start><im_patch><im_patch><dream_end> done",
    "<im_start><im_patch><im_end>", "text <dream> more text<image>", "[PAD][PAD]", "<s>prompt</s>",
]
LLAMA_SETTINGS = dict(model_type="bpe", byte_fallback=True, normalization_rule_name="identity",
                      add_dummy_prefix=True, remove_extra_whitespaces=False, split_digits=True,
                      allow_whitespace_only_pieces=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1)


def train(folder, name="tokenizer", vocab_size=700, **overrides):
    # A small SentencePiece BPE model (sentencepiece's own trainer, test-only), in about a second.
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 14))) + rng.choice(".,!? ") for _ in range(3000)]
    lines += CORPUS[:16] * 4
    settings = {**LLAMA_SETTINGS, **overrides}
    spm.SentencePieceTrainer.train(sentence_iterator=iter(lines), model_prefix=str(folder / name),
                                   vocab_size=vocab_size, character_coverage=0.9995, minloglevel=2, **settings)
    (folder / f"{name}.vocab").unlink()
    return folder / f"{name}.model"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    path = train(folder)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    n = sp.get_piece_size()
    (folder / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(ADDED_ORDER)}))
    return folder


def random_texts(sp, count, specials=(), seed=1):
    # strings built from the model's own pieces (so merges are exercised), stray characters (so byte
    # fallback is) and, if given, added tokens at random places
    rng = random.Random(seed)
    pieces = [sp.id_to_piece(i).replace("▁", " ") for i in range(3, sp.get_piece_size()) if not sp.is_byte(i)]
    chars = list("abcxyz  \n\t.,!?019éü日本中😀Ωß")
    out = []
    for _ in range(count):
        parts = []
        for _ in range(rng.randint(0, 14)):
            r = rng.random()
            parts.append(rng.choice(specials) if specials and r < 0.1 else rng.choice(pieces) if r < 0.6 else rng.choice(chars))
        out.append("".join(parts))
    return out


def sp_by_segment(sp, text, ids):
    # The official (slow, legacy) tokenizer's way: added tokens are cut out whole, every stretch of
    # text between them goes through sentencepiece on its own.
    pattern = "(" + "|".join(map(re.escape, sorted(ids, key=len, reverse=True))) + ")"
    out = []
    for part in re.split(pattern, text):
        out += [ids[part]] if part in ids else sp.encode(part) if part else []
    return out


def test_reader_sees_what_sentencepiece_sees(model_dir):
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    spec = convert.read_sentencepiece(model_dir / "tokenizer.model")
    assert len(spec["pieces"]) == sp.get_piece_size() == 700
    for i, (piece, score, kind) in enumerate(spec["pieces"]):
        assert piece == sp.id_to_piece(i) and score == pytest.approx(sp.get_score(i), abs=0)
        assert (kind == convert.BYTE) == sp.is_byte(i) and (kind == convert.CONTROL) == sp.is_control(i)
        assert (kind == convert.UNKNOWN) == sp.is_unknown(i)
    assert (spec["model_type"], spec["byte_fallback"], spec["unk_id"], spec["normalizer"]) == (2, 1, 0, "identity")
    assert spec["add_dummy_prefix"] and not spec["remove_extra_whitespaces"]
    assert [p for p, _, _ in spec["pieces"][:3]] == ["<unk>", "<s>", "</s>"]


def test_ids_equal_sentencepiece(model_dir):
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    tok = convert.sentencepiece_to_tokenizer_json(model_dir / "tokenizer.model")
    texts = [t for t in CORPUS if "<s>" not in t] + random_texts(sp, 2000)
    for text in texts:
        ids = tok.encode(text).ids
        assert ids == sp.encode(text), text
        assert tok.decode(ids) == sp.decode(ids), text
        if "▁" not in text:  # SentencePiece itself writes a literal "▁" back as a space
            assert tok.decode(ids) == text
    # byte fallback really happens (CJK and emoji are not in this small vocabulary)
    assert any(sp.is_byte(i) for i in tok.encode("日本語 😀").ids)


@pytest.mark.parametrize("overrides", [dict(remove_extra_whitespaces=True), dict(add_dummy_prefix=False)],
                         ids=["remove_extra_whitespaces", "no_dummy_prefix"])
def test_other_whitespace_settings(tmp_path, overrides):
    path = train(tmp_path, **overrides)
    sp = spm.SentencePieceProcessor(model_file=str(path))
    tok = convert.sentencepiece_to_tokenizer_json(path)
    for text in [t for t in CORPUS if "<s>" not in t] + random_texts(sp, 500):
        assert tok.encode(text).ids == sp.encode(text), text


def test_added_tokens_keep_their_ids(model_dir):
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    added = json.loads((model_dir / "added_tokens.json").read_text())
    tok = convert.sentencepiece_to_tokenizer_json(model_dir / "tokenizer.model", added)
    assert tok.get_vocab_size() == 708 and all(tok.token_to_id(t) == i for t, i in added.items())
    assert [tok.token_to_id(t) for t in ("<unk>", "<s>", "</s>")] == [0, 1, 2]
    ids = {**added, "<unk>": 0, "<s>": 1, "</s>": 2}
    for text in DREAMLLM_TEXT + random_texts(sp, 1500, specials=list(ids), seed=2):
        got = tok.encode(text).ids
        assert got == sp_by_segment(sp, text, ids), text
        assert tok.decode(got, skip_special_tokens=False).replace(" ", "") == text.replace(" ", "").replace("▁", "")
    enc = tok.encode("a<dream_start><im_patch><dream_end>")
    assert enc.ids[-3:] == [added["<dream_start>"], added["<im_patch>"], added["<dream_end>"]]


def test_legacy_false_equals_transformers(model_dir, tmp_path):
    # transformers 5's LlamaTokenizer converts tokenizer.model itself (it needs sentencepiece + protobuf);
    # legacy=False is its "▁ only at the very start" behaviour.
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("google.protobuf")
    (tmp_path / "tokenizer.model").write_bytes((model_dir / "tokenizer.model").read_bytes())
    ref = transformers.LlamaTokenizer.from_pretrained(str(tmp_path), legacy=False)
    ref.add_special_tokens({"pad_token": "[PAD]", "additional_special_tokens": ADDED_ORDER[1:]})
    added = json.loads((model_dir / "added_tokens.json").read_text())
    assert all(ref.convert_tokens_to_ids(t) == i for t, i in added.items())  # same order, same ids
    tok = convert.sentencepiece_to_tokenizer_json(model_dir / "tokenizer.model", added, legacy=False)
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "tokenizer.model"))
    specials = ADDED_ORDER + ["<s>", "</s>", "<unk>"]
    for text in CORPUS + DREAMLLM_TEXT + random_texts(sp, 1500, specials=specials, seed=3):
        ids = ref.encode(text, add_special_tokens=False)
        assert tok.encode(text).ids == ids, text
        assert tok.decode(ids, skip_special_tokens=False) == ref.decode(ids, skip_special_tokens=False), text


def test_bad_tokenizer_inputs(model_dir, tmp_path):
    cases = {
        "json.model": b'{"not": "a sentencepiece model"}',
        "truncated.model": (model_dir / "tokenizer.model").read_bytes()[:5000],
        "empty.model": b"",
    }
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(convert.ConvertError, match="not a SentencePiece model") as e:
            convert.sentencepiece_to_tokenizer_json(tmp_path / name)
        assert "\n" not in str(e.value) and name in str(e.value)
    with pytest.raises(convert.ConvertError, match="no such file"):
        convert.sentencepiece_to_tokenizer_json(tmp_path / "missing.model")
    unigram = train(tmp_path, "unigram", vocab_size=400, model_type="unigram")
    with pytest.raises(convert.ConvertError, match="a unigram model; only BPE"):
        convert.sentencepiece_to_tokenizer_json(unigram)
    with pytest.raises(convert.ConvertError, match="ids must run on from 700"):
        convert.sentencepiece_to_tokenizer_json(model_dir / "tokenizer.model", {"[PAD]": 700, "<image>": 702})


def test_tokenizer_cli(model_dir, tmp_path, capsys):
    for name in ("tokenizer.model", "added_tokens.json"):
        (tmp_path / name).write_bytes((model_dir / name).read_bytes())
    assert convert.main(["tokenizer", str(tmp_path)]) == 0
    assert "708 tokens" in capsys.readouterr().out
    tok = Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    sp = spm.SentencePieceProcessor(model_file=str(tmp_path / "tokenizer.model"))
    assert tok.encode(CORPUS[1]).ids == sp.encode(CORPUS[1]) and tok.token_to_id("<dream_start>") == 703
    assert convert.main(["tokenizer", str(tmp_path)]) == 1  # refuses to overwrite
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "--force" in err and err.count("\n") == 1
    assert convert.main(["tokenizer", str(tmp_path), "--force"]) == 0
    assert convert.main(["tokenizer", str(tmp_path / "nowhere")]) == 1
    assert "no such file" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------
# .bin -> safetensors

def tiny_llama_folder(folder, tie=False, shards=2):
    # A random tiny LLaMA written the way Vicuna's repo is: config.json, pytorch_model-0000k-of-0000n.bin
    # and pytorch_model.bin.index.json (or one pytorch_model.bin), fp16, with the rotary_emb.inv_freq
    # buffers that transformers < 4.31 saved.
    cfg = llama.LlamaConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64, hidden_dim=48, tie_embeddings=tie)
    torch.manual_seed(0)
    model = llama.build(cfg)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(std=0.2)
    state = {k: v.half() for k, v in model.state_dict().items()}
    if tie:  # torch.save keeps the sharing: both names point at one storage
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    for i in range(cfg.n_layers):
        state[f"model.layers.{i}.self_attn.rotary_emb.inv_freq"] = torch.rand(cfg.head_dim // 2)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf()))
    (folder / "tokenizer.model").write_bytes(b"copied along")
    if shards == 1:
        torch.save(state, folder / "pytorch_model.bin")
        return state
    keys = list(state)
    groups = [keys[i::shards] for i in range(shards)]
    weight_map = {}
    for k, group in enumerate(groups, 1):
        name = f"pytorch_model-{k:05d}-of-{shards:05d}.bin"
        torch.save({key: state[key] for key in group}, folder / name)
        weight_map.update({key: name for key in group})
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))
    return state


def assert_same_model(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids = torch.randint(0, 64, (2, 7))
    assert torch.equal(a(ids), b(ids))


def test_sharded_bin_to_safetensors(tmp_path):
    src, dst = tmp_path / "vicuna", tmp_path / "vicuna-st"
    state = tiny_llama_folder(src, shards=2)
    assert convert.main(["safetensors", str(src), str(dst)]) == 0
    names = sorted(p.name for p in dst.iterdir())
    assert names == ["config.json", "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors",
                     "model.safetensors.index.json", "tokenizer.model"]  # no .tmp left, no .bin copied
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == {k for k in state if not k.endswith("inv_freq")}
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for k, v in state.items() if not k.endswith("inv_freq"))
    assert_same_model(llama.load(src), llama.load(dst))
    assert llama.load(dst, dtype=torch.float16).lm_head.weight.dtype == torch.float16


def test_tied_single_bin_in_place(tmp_path):
    src = tmp_path / "tied"
    tiny_llama_folder(src, tie=True, shards=1)
    before = llama.load(src)
    assert convert.bin_to_safetensors(src) == [src / "model.safetensors"]  # written beside the .bin
    after = llama.load(src)  # load() now prefers model.safetensors
    assert_same_model(before, after)
    assert after.lm_head.weight is after.model.embed_tokens.weight


def test_bad_weight_inputs(tmp_path, capsys):
    src = tmp_path / "broken"
    tiny_llama_folder(src, shards=2)
    (src / "pytorch_model-00002-of-00002.bin").unlink()
    assert convert.main(["safetensors", str(src), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pytorch_model-00002-of-00002.bin" in err and "missing" in err
    assert not (tmp_path / "out").exists()
    (src / "pytorch_model-00002-of-00002.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(convert.ConvertError, match="cannot be read"):
        convert.bin_to_safetensors(src, tmp_path / "out")
    good = tmp_path / "good"
    tiny_llama_folder(good, shards=1)
    convert.bin_to_safetensors(good)
    with pytest.raises(convert.ConvertError, match="exists; pass --force"):
        convert.bin_to_safetensors(good)
    convert.bin_to_safetensors(good, force=True)
