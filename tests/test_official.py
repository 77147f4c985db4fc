# weights/official.py on tiny replicas of the released layouts (CPU, never the network):
# - the DreamLLM-7B release: the same file names, key names and dtype (bf16 .bin files written by
#   torch.save), added_tokens.json with the official ids and order, a SentencePiece tokenizer.model
#   trained here, config.json with DreamLLM's fields; only the sizes are small.
# - the SD 2.1-base pipeline for the plain-SD baseline: text_encoder/ (a transformers CLIPTextModel),
#   tokenizer/ (CLIP BPE files, padded with "!"), unet/, vae/, scheduler/.
import functools
import json
import random
from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

import clip
import dreamllm
import llama
import sample
import unet
from plumbing import cli
from plumbing.checkpoint import CheckpointError
from test_convert import ADDED_ORDER, train as train_sentencepiece
from weights import official

LLM = llama.LlamaConfig(dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=0, hidden_dim=96)  # vocab: below
CLIP = clip.PRESETS["clip-tiny-vision"]                                    # width 64, 32 px, 16 patches
SD = dict(unet.PRESETS["tiny"], unet=replace(unet.PRESETS["tiny"]["unet"], context_dim=40))  # context 40
SMALL = dict(clip_config=CLIP, sd=SD, image_size=64)  # what load_official needs to know for a replica
K = 8
N = 500  # SentencePiece pieces (the corpus needs ~360 characters and bytes)


pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def bf16(state, prefix=""):
    return {prefix + k: v.detach().to(torch.bfloat16).contiguous() for k, v in state.items()}


def write_release(folder):
    # the release's files, tiny; returns the tensors written, by file
    train_sentencepiece(folder, vocab_size=N)
    n = N
    (folder / "added_tokens.json").write_text(json.dumps({t: n + i for i, t in enumerate(ADDED_ORDER)}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"add_bos_token": True, "add_eos_token": False,
                                                              "model_max_length": 2048, "legacy": True}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"bos_token": "<s>", "eos_token": "</s>",
                                                                "unk_token": "<unk>", "pad_token": "[PAD]"}))
    cfg = replace(LLM, vocab_size=n + 8)
    plugins = {"clip_vision_embedding": {"projector_type": "linear", "projector_depth": 1, "select_layer": -2,
                                         "clip_vision_model_name_or_path": "openai/clip-vit-large-patch14"},
               "dream_embedding": {"num_dream_queries": K},
               "stable_diffusion_head": {"projector_type": "linear", "projector_depth": 1,
                                         "diffusion_name_or_path": "stabilityai/stable-diffusion-2-1-base"}}
    # as the release's: model_type "dreamllm", and the odd bos/eos ids 0/1 (the tokenizer's are 1/2)
    (folder / "config.json").write_text(json.dumps(cfg.to_hf() | dict(
        model_type="dreamllm", architectures=["DreamLLMForCausalMLM"], bos_token_id=0, eos_token_id=1,
        plugins_init_kwargs=plugins, loss_weight_lm=1.0, loss_weight_vm=10.0)))
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        lm = bf16(llama.build(cfg).state_dict())
        lm |= {f"model.layers.{i}.self_attn.rotary_emb.inv_freq": torch.rand(6) for i in range(cfg.n_layers)}
        vit = bf16(clip.build(replace(CLIP, projection_dim=None)).state_dict(), "clip_vision_model.")
        vit |= bf16({"weight": torch.randn(48, 64, generator=g), "bias": torch.randn(48, generator=g)},
                    "projector.projector.")
        head = bf16(unet.build_unet(SD).state_dict(), "unet.")
        # the VAE's attention under the old diffusers names, as SD 2.1-base's own file still has them
        old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
        for k, v in bf16(unet.build_vae(SD).state_dict()).items():
            for new, was in old.items():
                k = k.replace(f"attentions.0.{new}.", f"attentions.0.{was}.")
            head["vae." + k] = v
        head["projector.projector.weight"] = torch.randn(40, 48, generator=g).bfloat16()
        dream = {"dream_queries": torch.randn(1, K, 48, generator=g).bfloat16()}
    files = {"pytorch_model.bin": lm, "clip_vision_embedding.bin": vit, "dream_embedding.bin": dream,
             "stable_diffusion_head.bin": head}
    for name, state in files.items():
        torch.save(state, folder / name)
    return files


@pytest.fixture(scope="module")
def release(tmp_path_factory):
    folder = tmp_path_factory.mktemp("dreamllm-7b-chat")
    return folder, write_release(folder)


@pytest.fixture(scope="module")
def model(release):
    return official.load_official(release[0], **SMALL)


def picture():
    return Image.frombytes("RGB", (40, 30), bytes(random.Random(0).randrange(256) for _ in range(40 * 30 * 3)))


def watch_embed(model, monkeypatch):  # -> the token ids of every sequence the model embeds, as it goes
    seen = []
    embed = model.embed
    monkeypatch.setattr(model, "embed", lambda ids, *a: seen.append(ids[0].tolist()) or embed(ids, *a))
    return seen


def read_slot(model):
    t = model.token_id
    return [t["<im_start>"]] + [t["<im_patch>"]] * model.n_patches + [t["<im_end>"]]


def test_loads_strictly_in_bf16_with_the_files_tensors(release, model):
    folder, files = release
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    spot = {("pytorch_model.bin", "model.layers.1.self_attn.q_proj.weight"):
                model.llm.model.layers[1].self_attn.q_proj.weight,
            ("pytorch_model.bin", "lm_head.weight"): model.llm.lm_head.weight,
            ("clip_vision_embedding.bin", "clip_vision_model.vision_model.encoder.layers.3.mlp.fc2.bias"):
                model.clip.vision_model.encoder.layers[3].mlp.fc2.bias,
            ("clip_vision_embedding.bin", "projector.projector.bias"): model.visual_projector.bias,
            ("dream_embedding.bin", "dream_queries"): model.dream_queries[None],
            ("stable_diffusion_head.bin", "unet.conv_in.weight"): model.unet.conv_in.weight,
            ("stable_diffusion_head.bin", "vae.decoder.mid_block.attentions.0.query.weight"):
                model.vae.decoder.mid_block.attentions[0].to_q.weight,
            ("stable_diffusion_head.bin", "projector.projector.weight"): model.condition_projector.weight}
    for (name, key), ours in spot.items():
        assert torch.equal(ours, files[name][key]), key
    assert model.condition_projector.bias is None and model.config.n_queries == K and model.config.clip_layer == -2


def test_the_official_token_ids_are_looked_up_not_assumed(model):
    n = N
    assert model.n_text_vocab == n and model.llm.cfg.vocab_size == n + 8  # nothing added, nothing resized
    assert (model.bos_id, model.eos_id) == (1, 2)  # the tokenizer's, not config.json's 0 / 1
    assert {s: model.token_id[s] for s in dreamllm.SPECIAL_TOKENS} == \
        {s: n + ADDED_ORDER.index(s) for s in dreamllm.SPECIAL_TOKENS}
    assert model.tokenizer.get_vocab_size() == n + 8


def test_runs_end_to_end(model):
    g = torch.Generator().manual_seed(0)
    sampling = dict(steps=2, guidance=3.0, generator=g, progress=False)
    images = model.text_to_image("a red bicycle", num_images=2, **sampling)
    assert len(images) == 2 and images[0].size == (64, 64)
    reply = model.answer(picture(), "What is in the picture?", max_new_tokens=5, progress=False)
    assert isinstance(reply, str)
    segments = model.generate(official.VICUNA_V1_1.chat("Write about a bicycle."),
                              max_new_tokens=4, force_image=True, **sampling)
    assert isinstance(segments[0], Image.Image) and all(isinstance(s, str) for s in segments[1:])


def test_official_prompt_formats(model, monkeypatch):
    system = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
              "helpful, detailed, and polite answers to the user's questions.")
    assert official.VICUNA_V1_1.chat("<image>What is it?") == f"{system} USER: <image>What is it? ASSISTANT:"
    seen = watch_embed(model, monkeypatch)
    t, tok = model.token_id, model.tokenizer
    # text -> image: BOS + the prompt's tokens + <dream_start> + K queries (no space token between)
    model.text_to_image("a red bicycle", steps=1, progress=False)
    assert seen[0] == [1] + tok.encode("a red bicycle", add_special_tokens=False).ids + \
        [t["<dream_start>"]] + [t["<im_patch>"]] * K
    assert seen[1] == [1, t["<dream_start>"]] + [t["<im_patch>"]] * K  # the CFG null: the empty prompt
    # chat about an image: BOS + the template, the image a read slot only: <im_start> N x <im_patch> <im_end>
    seen.clear()
    model.answer(picture(), "What is it?", max_new_tokens=1, progress=False)
    before, after = f"{system} USER: ", "What is it? ASSISTANT:"
    read = read_slot(model)
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids
    assert seen[0] == [1] + enc(before) + read + enc(after) and t["<dream_start>"] not in seen[0]


def test_image_and_text_to_image_reads_the_picture_before_the_dream_slot(model, monkeypatch):
    # the official pipeline's MultimodalContent prompt: each <image> a read slot, then the queries
    seen = watch_embed(model, monkeypatch)
    t, tok = model.token_id, model.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    images = model.text_to_image("a bicycle like <image>", images=[picture()], steps=1, progress=False)
    read = read_slot(model)
    assert seen[0] == [1] + enc("a bicycle like ") + read + [t["<dream_start>"]] + [t["<im_patch>"]] * K
    assert images[0].size == (64, 64)
    with torch.no_grad():
        plain = model.condition("a bicycle like")
        assert not torch.allclose(model.condition("a bicycle like <image>", [picture()]), plain)


def test_the_null_condition_is_the_negative_prompt(model, monkeypatch):
    seen = []
    condition = model.condition
    monkeypatch.setattr(model, "condition", lambda p="", *a, **k: seen.append(p) or condition(p, *a, **k))
    model.text_to_image("a red bicycle", steps=1, progress=False, negative="blurry")
    assert seen == ["a red bicycle", "blurry"]  # the prompt's condition, then CFG's null


@pytest.mark.parametrize("preset", ["dreamllm-7b", "dreamllm-7b-aesthetic"])
def test_sample_runs_the_official_scripts_settings(preset, release, model, monkeypatch, tmp_path):
    monkeypatch.setitem(official.PRESETS, preset, release[0])
    monkeypatch.setattr(official, "load_official", lambda *a, **k: model)
    calls = []
    monkeypatch.setattr(type(model), "text_to_image", lambda self, prompt, n, **kw: calls.append((prompt, kw))
                        or [picture()] * n)
    monkeypatch.setattr(type(model), "answer", lambda self, image, q, **kw: calls.append((q, kw)) or "a bike")
    sample.main(["--model", preset, "--prompt", "a bike", "--num-images", "1", "--out", str(tmp_path),
                 "--device", "cpu"])
    prompt, kw = calls[0]
    want = official.SAMPLING[preset]
    assert (kw["sampler"], kw["steps"], kw["guidance"], kw["negative"]) == \
        ("ddpm", 150, want["guidance"], want["negative"])
    assert prompt == want["prefix"] + "a bike" and (preset.endswith("aesthetic")) == bool(want["prefix"])
    sample.main(["--model", preset, "--prompt", "a bike", "--steps", "20", "--sampler", "ddim",
                 "--negative", "", "--prefix", "", "--num-images", "1", "--out", str(tmp_path), "--device", "cpu"])
    prompt, kw = calls[1]  # every default one flag away
    assert (prompt, kw["sampler"], kw["steps"], kw["negative"]) == ("a bike", "ddim", 20, "")
    picture().save(tmp_path / "p.png")
    sample.main(["--model", preset, "--image", str(tmp_path / "p.png"), "--question", "What is it?",
                 "--out", str(tmp_path), "--device", "cpu"])
    assert calls[2][1]["beams"] == official.BEAMS == 5  # the official VQA's beam search


def test_answers_by_beam_search(model):
    with torch.no_grad():
        greedy = model.answer(picture(), "What is it?", max_new_tokens=4, progress=False)
        assert model.answer(picture(), "What is it?", beams=1, max_new_tokens=4, progress=False) == greedy
        beamed = model.answer(picture(), "What is it?", beams=3, max_new_tokens=4)
    assert isinstance(beamed, str)


def test_build_resolves_the_preset(release, monkeypatch, tmp_path):
    monkeypatch.setitem(official.PRESETS, "dreamllm-7b", release[0])
    m = cli.build_model("dreamllm-7b", **SMALL)
    assert m.prompts is official.VICUNA_V1_1 and m.config.image_size == 64
    monkeypatch.setitem(official.PRESETS, "dreamllm-7b", tmp_path / "nothing")
    with pytest.raises(CheckpointError) as e:
        cli.build_model("dreamllm-7b")
    assert "\n" not in str(e.value) and "python -m weights.download dreamllm-7b-chat" in str(e.value)


def test_missing_or_wrong_files_fail_in_one_line(release, tmp_path):
    folder, files = release
    for f in folder.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    (tmp_path / "dream_embedding.bin").unlink()
    with pytest.raises(CheckpointError) as e:
        official.load_official(tmp_path, **SMALL)
    assert str(e.value).count("\n") == 0 and "dream_embedding.bin: missing" in str(e.value)
    assert "`python -m weights.download dreamllm-7b-chat`" in str(e.value)
    torch.save(files["dream_embedding.bin"], tmp_path / "dream_embedding.bin")
    # an LLM of another width than config.json says
    other = bf16(llama.build(replace(LLM, dim=32, vocab_size=N + 8)).state_dict())
    torch.save(other, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        official.load_official(tmp_path, **SMALL)
    msg = str(e.value)
    assert "\n" not in msg and "wrong shapes" in msg and "llm.model.embed_tokens.weight" in msg
    # plugin copies inside pytorch_model.bin are not read; an unknown key is named with its file
    torch.save(files["pytorch_model.bin"] | {"model.dream_embedding.dream_queries": torch.zeros(1, K, 48),
                                             "model.mystery": torch.zeros(2)}, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError) as e:
        official.load_official(tmp_path, **SMALL)
    assert "1 unexpected keys: llm.model.mystery" in str(e.value)
    (tmp_path / "stable_diffusion_head.bin").write_bytes(b"truncated")
    with pytest.raises(CheckpointError, match="stable_diffusion_head.bin: cannot be read"):
        official.load_official(tmp_path, **SMALL)


# ----------------------------------------------------------------------------------------------------
# The plain-SD baseline

WORDS = "a photo of the red blue green cat dog bicycle sofa wall brick sitting on in under painting".split()
CORPUS = ["A photo of a cat", "a  RED bicycle,  against a brick wall!", "café naïve über", "it's, we'll, I'd",
          "digits 2024 and 3.14", "emoji 😀 and 日本", "   spaces\tand\nnewlines  ", "", "!!!",
          "<|startoftext|>inside<|endoftext|>", " ".join(["long"] * 100)]


def write_clip_bpe(folder):
    # CLIP's files as CLIP builds them: 256 byte symbols, the same with "</w>", then one token per merge,
    # then <|startoftext|> <|endoftext|>; the merges learned here on a small corpus
    tok = Tokenizer(models.BPE(end_of_word_suffix="</w>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rng = random.Random(0)
    lines = [" ".join(rng.choice(WORDS) for _ in range(8)) for _ in range(500)]
    tok.train_from_iterator(lines, trainers.BpeTrainer(vocab_size=400, end_of_word_suffix="</w>", show_progress=False))
    merges = [m if isinstance(m, str) else " ".join(m) for m in json.loads(tok.to_str())["model"]["merges"]]
    base = list(pre_tokenizers.ByteLevel.alphabet())
    vocab = base + [b + "</w>" for b in base] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {v: i for i, v in enumerate(dict.fromkeys(vocab))}
    folder.mkdir(parents=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>", "pad_token": "!"}))
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77, "pad_token": "!",
                                                              "do_lower_case": True}))
    return len(vocab)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sd-2.1-base")
    n = write_clip_bpe(folder / "tokenizer")
    torch.manual_seed(0)
    CLIPTextModel(CLIPTextConfig(hidden_size=40, intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                                 vocab_size=n, max_position_embeddings=77, hidden_act="gelu", eos_token_id=2)
                  ).save_pretrained(folder / "text_encoder")
    for part, model in (("unet", unet.build_unet(SD)), ("vae", unet.build_vae(SD))):
        (folder / part).mkdir()
        (folder / part / "config.json").write_text(json.dumps(model.config.to_diffusers()))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()},
                  folder / part / "diffusion_pytorch_model.safetensors")
    (folder / "scheduler").mkdir()
    (folder / "scheduler" / "scheduler_config.json").write_text(json.dumps(SD["scheduler"]))
    return folder


def test_clip_tokenizer_equals_transformers(sd_folder):
    ref = CLIPTokenizer.from_pretrained(sd_folder / "tokenizer")
    ours = official.clip_tokenizer(sd_folder / "tokenizer")
    rng = random.Random(1)
    words = WORDS + ["Ünïcode", "x,y", "it's", "42", "wall!", "A!B"]
    texts = CORPUS + [" ".join(rng.choice(words) for _ in range(rng.randint(0, 12))) for _ in range(200)]
    want = ref(texts, padding="max_length", max_length=77, truncation=True).input_ids
    got = ours(texts).tolist()
    bad = [(t, g, w) for t, g, w in zip(texts, got, want) if g != w]
    assert not bad, bad[:3]
    assert got[0][-1] == ref.convert_tokens_to_ids("!")  # SD 2.x pads with "!"


def test_plain_sd_and_sample_side_by_side(release, sd_folder, tmp_path, monkeypatch, capsys):
    sd = official.StableDiffusion(sd_folder)
    images = sd.text_to_image("a red bicycle", 2, steps=2, image_size=64, progress=False,
                              generator=torch.Generator().manual_seed(0))
    assert len(images) == 2 and images[0].size == (64, 64)
    # sample.py: the replica release with the baseline beside it (small configs for the replica)
    monkeypatch.setattr(official, "load_official", functools.partial(official.load_official, **SMALL))
    sample.main(["--model", str(release[0]), "--prompt", "a red bicycle", "--num-images", "2", "--steps", "2",
                 "--baseline-sd", "--sd", str(sd_folder), "--out", str(tmp_path), "--device", "cpu"])
    names = {p.name for p in tmp_path.iterdir()}
    assert {"a_red_bicycle_0.png", "sd_a_red_bicycle_1.png", "grid.png"} <= names
    with Image.open(tmp_path / "grid.png") as grid:
        assert grid.height > 2 * 64  # two rows: DreamLLM's and SD's
    with pytest.raises(SystemExit) as e:  # no SD folder: one line naming the download
        sample.main(["--model", str(release[0]), "--prompt", "x", "--baseline-sd", "--sd", str(tmp_path / "none"),
                     "--out", str(tmp_path / "o"), "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "python -m weights.download sd-2.1-base" in err and "\n" not in err
    with pytest.raises(SystemExit) as e:  # no release folder: one line naming the download
        sample.main(["--model", str(tmp_path / "none"), "--prompt", "x", "--out", str(tmp_path / "o"),
                     "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert e.value.code == 1 and "python -m weights.download dreamllm-7b-chat" in err and "\n" not in err


# ---- the release as its own evaluations run it ------------------------------------------------------

# scripts/eval/vqa/eval_vqa.sh (RunpeiDong/DreamLLM 9dc7677), each block's strings as the script
# writes them (the shell's unquoting aside: '\(one word\)' arrives as (one word)), and its --clip
# and --beamsearch: (system_prompt, prompt, post_prompt, clip, beams)
EVAL_VQA_SH = {
    "coco-caption": ("Based on the image, give the image caption briefly.",  # l.2-15
                     "Please summarize object in one sentence within 10 words.", "The image depicts", False, 5),
    "nocaps": ("", "Please summarize object briefly in one sentence within 5 words.", "", False, 5),  # l.17-28
    "image2paragraph": ("Based on the image, please describe the image in detail.",  # l.30-43
                        "Please describe the image in detail.", "The image depicts", False, 5),
    "vqav2": ("", "", "", False, 5),  # l.45-59
    "vqav2-testdev": ("Based on the image, please answer the question.",  # l.61-75
                      "Please provide an accurate answer within one word.", "The short answer (one word) is:", True, 5),
    "textvqa": ("Based on the image, please answer the question.",  # l.77-91
                "Please provide an accurate answer within one word.", "The answer is:", True, 5),
    "mmbench": ("This is an exam, please answer according to the image, hint and question.",  # l.93-105
                "Please provide an accurate and detailed answer.", "", False, 5),
    "mm-vet": ("This is an exam, please answer according to the image and question.",  # l.107-119
               "Please provide an accurate, detailed and comprehensive answer.", "", False, 5),
    "vizwiz": ("", "", "", False, 5),  # l.121-130
    "vizwiz-test": ("Based on the image, please answer the question.",  # l.132-145
                    "Please provide an accurate answer within one word.", "The answer is:", True, 5),
    "okvqa": ("", "Please provide an accurate and brief answer within one word.",  # l.147-160
              "The short answer (one word) is:", True, 5),
    "docvqa": ("", "", "", False, 5), "infographicvqa": ("", "", "", False, 5),  # l.165-185
    "ocr": ("", "", "", False, 5),  # l.188-197
    "pope": ("Based on the image, please objectively and accurately indicate whether the object exists.",
             "", "The answer is:", False, 1),  # l.200-236: --beamsearch False, sampled
}


def test_vqa_protocols_are_the_official_scripts():
    assert {name: (p.system_prompt, p.prompt, p.post_prompt, p.clip, p.beams)
            for name, p in official.PROTOCOLS.items()} == EVAL_VQA_SH
    assert [n for n, p in official.PROTOCOLS.items() if p.known_first] == ["vizwiz", "vizwiz-test"]
    assert [n for n, p in official.PROTOCOLS.items() if p.pad_square] == ["docvqa", "infographicvqa", "ocr"]
    # the eval template's system message has a leading space the training template's lacks
    assert official.EVAL_FORMAT.system == " " + official.VICUNA_V1_1.system
    assert official.MAX_NEW_TOKENS == 1024 and official.BEAMS == 5


def test_a_vqa_protocol_asks_the_official_string(model, monkeypatch):
    seen = watch_embed(model, monkeypatch)
    t, tok = model.token_id, model.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    scored, written = official.ask(model, picture(), "What sport is this?", "okvqa", max_new_tokens=2)
    read = read_slot(model)
    # vqa_inference.py's prompt: " {system} USER: " + image + question + prompt + " ASSISTANT: " + post_prompt,
    # tokenized as one string (the post-prompt's space spelt with its first word, as SentencePiece does)
    system = official.EVAL_FORMAT.system
    assert seen[0] == [1] + enc(f"{system} USER: ") + read + enc(
        "What sport is this?Please provide an accurate and brief answer within one word. ASSISTANT: "
        "The short answer (one word) is:")
    assert enc(" A chat")[:2] != enc("A chat")[:2]  # the leading space is a token of its own
    assert scored == official.cut(written, official.PROTOCOLS["okvqa"])


def test_protocols_cut_answers_and_pad_pictures_as_the_official_scripts():
    okvqa, caption, pope = (official.PROTOCOLS[n] for n in ("okvqa", "coco-caption", "pope"))
    assert official.cut('Tennis, or "squash".', okvqa) == "tennis"
    assert official.cut("a RED bicycle by a wall.", caption) == "A red bicycle by a wall."
    assert official.cut("No, there is no dog in the image.", pope) == "no"
    assert official.cut("Yes. There is not a cat but a dog.", pope) == "yes"  # the first sentence alone
    wide = Image.new("RGB", (300, 100), (255, 0, 0))
    square = official.pad_square(wide)
    assert square.size == (224, 224) and square.getpixel((200, 50)) == (255, 0, 0)
    assert square.getpixel((100, 200)) == (0, 0, 0)  # padded below, black


class Asked:  # a model that answers from a script and records how it was asked
    def __init__(self, *replies):
        self.replies, self.calls = list(replies), []

    def answer(self, image, message, **kw):
        self.calls.append((message, kw))
        return self.replies.pop(0)


def test_vizwiz_asks_first_whether_the_answer_can_be_known():
    m = Asked("No, it cannot be known.")
    assert official.ask(m, picture(), "What is this?", "vizwiz-test")[0] == "unanswerable"
    (first, kw), = m.calls
    assert first == "<image>What is this?Is the answer can be known?" and "answer_start" not in kw
    m = Asked("Yes.", "A can of soup.")
    assert official.ask(m, picture(), "What is this?", "vizwiz-test")[0] == "a can of soup"
    message, kw = m.calls[1]
    assert message == ("Based on the image, please answer the question.<image>What is this?"
                       "Please provide an accurate answer within one word.")
    assert kw["answer_start"] == "The answer is:" and kw["beams"] == 5 and kw["prompts"] is official.EVAL_FORMAT
    m = Asked("There is a dog.")
    official.ask(m, picture(), "Is there a dog in the image?", "pope")
    assert m.calls[0][1]["beams"] == 1 and m.calls[0][1]["temperature"] == 0.2  # POPE samples


def test_a_chat_of_several_turns_as_the_official_template(model, monkeypatch):
    seen = watch_embed(model, monkeypatch)
    t, tok = model.token_id, model.tokenizer
    enc = lambda s: tok.encode(s, add_special_tokens=False).ids  # noqa: E731
    model.answer(picture(), "And its colour?", history=[("What is it?", "A bicycle.")], max_new_tokens=1,
                 progress=False)
    read = read_slot(model)
    system = official.VICUNA_V1_1.system  # "</s>" below: the tokenizer's EOS, as the official string has it
    assert seen[0] == [1] + enc(f"{system} USER: ") + read + enc(
        "What is it? ASSISTANT: A bicycle.</s>USER: And its colour? ASSISTANT:")
    assert enc("</s>") == [model.eos_id]
    # as training lays it out: the replies and their EOS learned, nothing else; an image in a reply
    # (the official chats' <dream>) a dream slot then a read slot, none of it learned
    texts, replies = official.VICUNA_V1_1.turns(["<image>What is it?", "Draw one."], ["A bicycle.", "Here: <image>"])
    ids, labels = model.encode_document(texts, 2, "chat", replies)
    dream = [t["<dream_start>"]] + [t["<im_patch>"]] * K + [t["<dream_end>"]]
    assert ids.tolist() == [1] + enc(f"{system} USER: ") + read + enc(
        "What is it? ASSISTANT: A bicycle.</s>USER: Draw one. ASSISTANT: Here: ") + dream + read + [model.eos_id]
    learned = [i for i, l in zip(ids.tolist(), labels.tolist()) if l != -100]
    assert t["<dream_start>"] not in learned
    first_eos = learned.index(model.eos_id)
    assert tok.decode(learned[:first_eos]).strip() == "A bicycle." and learned[-1] == model.eos_id
    assert tok.decode(learned[first_eos + 1:-1]).strip() == "Here:" and learned.count(model.eos_id) == 2
    assert dreamllm.DreamLLM.image_slots(texts, "chat", replies) == ["read", "dream+read"]


def test_best_of_n_ranks_by_clip_as_the_papers_coco_protocol(release, tmp_path, monkeypatch):
    # a full CLIP in the official layout (transformers' CLIPModel, tiny) with its BPE files: the scorer
    from transformers import CLIPConfig, CLIPModel
    scorer = tmp_path / "clip"
    n = write_clip_bpe(scorer)
    torch.manual_seed(0)
    ref = CLIPModel(CLIPConfig(
        text_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         vocab_size=n, max_position_embeddings=77, eos_token_id=2),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           image_size=32, patch_size=8), projection_dim=16)).eval()
    ref.save_pretrained(scorer)
    monkeypatch.setattr(official, "load_official", functools.partial(official.load_official, **SMALL))
    out = tmp_path / "out"
    sample.main(["--model", str(release[0]), "--prompt", "a red bicycle", "--best-of", "3", "--seed", "42",
                 "--steps", "2", "--scorer", str(scorer), "--out", str(out), "--device", "cpu"])
    ranked = json.loads((out / "best_of.json").read_text())["images"]
    assert [r["seed"] for r in ranked] == [42, 43, 44] and sum(r["best"] for r in ranked) == 1
    images = [Image.open(out / r["file"]) for r in ranked]
    with torch.no_grad():  # CLIP's logits_per_image, as the official select_image ranks them
        pixels = torch.stack([clip.preprocess(im, 32) for im in images])
        ids = CLIPTokenizer.from_pretrained(scorer)(["a red bicycle"], padding="max_length", max_length=77).input_ids
        want = ref(pixel_values=pixels, input_ids=torch.tensor(ids)).logits_per_image[:, 0]
    assert torch.allclose(torch.tensor([r["clip_score"] for r in ranked]), want, atol=1e-4)
    best = int(want.argmax())
    assert ranked[best]["best"] and (out / "a_red_bicycle_best.png").read_bytes() == \
        (out / ranked[best]["file"]).read_bytes()
    # each candidate is its seed's own draw: the same as --seed 43 alone
    sample.main(["--model", str(release[0]), "--prompt", "a red bicycle", "--num-images", "1", "--seed", "43",
                 "--steps", "2", "--out", str(tmp_path / "one"), "--device", "cpu"])
    assert Image.open(tmp_path / "one" / "a_red_bicycle_0.png").tobytes() == images[1].tobytes()


def test_the_release_draws_in_fp32_and_answers_in_bf16():
    args = lambda question=None, dtype=None: SimpleNamespace(question=question, dtype=dtype)  # noqa: E731
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert sample.weights_dtype(args(), cuda) == torch.float32  # drawing, as inference.py:58
    assert sample.weights_dtype(args("What?"), cuda) == torch.bfloat16  # vqa_inference.py:293
    assert sample.weights_dtype(args("What?"), cpu) == torch.float32
    assert sample.weights_dtype(args(dtype="bf16"), cuda) == torch.bfloat16  # --dtype overrides


def test_sample_asks_by_a_vqa_protocol(release, model, monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(official.PRESETS, "dreamllm-7b", release[0])
    monkeypatch.setattr(official, "load_official", lambda *a, **k: model)
    asked = []
    monkeypatch.setattr(official, "ask", lambda m, im, q, name, n, g: asked.append((q, name, n)) or ("tennis", "Tennis."))
    picture().save(tmp_path / "p.png")
    sample.main(["--model", "dreamllm-7b", "--image", str(tmp_path / "p.png"), "--question", "What sport?",
                 "--vqa-protocol", "okvqa", "--out", str(tmp_path), "--device", "cpu"])
    assert capsys.readouterr().out == "tennis\n" and asked == [("What sport?", "okvqa", 1024)]


def test_a_generation_config_that_would_change_decoding_is_named(release, capsys, tmp_path):
    assert official._generation_config(release[0]) == {}
    (tmp_path / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": 1, "eos_token_id": 2, "max_length": 2048, "temperature": 0.9, "top_p": 0.6}))
    assert official._generation_config(tmp_path) == {"temperature": 0.9, "top_p": 0.6}
