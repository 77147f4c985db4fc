"""Loading the released DreamLLM-7B and its prompt formats; and plain Stable Diffusion, the paper's baseline.

The release (RunpeiDong/dreamllm-7b-chat-v1.0; `python -m weights.download dreamllm-7b-chat`) is one
folder written by the official code's save: the LLM in Hugging Face Llama names, and beside it one
`torch.save`d state dict per plugin module, the module's attribute names as keys:

    pytorch_model.bin          model.embed_tokens, model.layers.N.*, model.norm, lm_head (32008 rows)
    clip_vision_embedding.bin  clip_vision_model.vision_model.* (a CLIPVisionModel), projector.projector.{weight,bias}
    dream_embedding.bin        dream_queries [1, 64, 4096]
    stable_diffusion_head.bin  unet.*, vae.* (diffusers names), projector.projector.weight [1024, 4096] (no bias)
    tokenizer.model + added_tokens.json   SentencePiece + 8 tokens: [PAD] <im_start> <dream_end> ... (32000-32007)

A short table of prefixes maps every key into our DreamLLM; the modules are built on the meta device and
the tensors assigned, strictly, so the 7B model never exists twice in memory.

    model = official.load_official("weights/dreamllm-7b-chat", dtype=torch.bfloat16).to("cuda")
    model.text_to_image("a red bicycle against a brick wall")   # BOS + prompt + dream slot, CFG on ""
    model.answer(image, "What is unusual about this image?")     # Vicuna v1.1 chat, the image read by CLIP
"""
import json
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from PIL import Image
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers
from tqdm import tqdm

import clip
import llama
import unet
from diffusion import sample_cfg
from dreamllm import DreamConfig, DreamLLM, PromptFormat
from plumbing.checkpoint import CheckpointError, assign, read_config, read_state_dict

DOWNLOAD = "python -m weights.download dreamllm-7b-chat"
# the released models, as weights/download.py writes them: preset name -> folder (cli.build_model)
WEIGHTS = Path(__file__).resolve().parent  # weights/, where this file is
PRESETS = {"dreamllm-7b": WEIGHTS / "dreamllm-7b-chat", "dreamllm-7b-aesthetic": WEIGHTS / "dreamllm-7b-chat-aesthetic"}
# file -> {prefix in the file: prefix in our DreamLLM}. A key no prefix covers keeps its file's name in
# front, so that a strict assign() names it as unexpected, with its file.
LAYOUT = {
    "pytorch_model.bin": {"model.": "llm.model.", "lm_head.": "llm.lm_head."},
    "clip_vision_embedding.bin": {"clip_vision_model.": "clip.", "projector.projector.": "visual_projector."},
    "dream_embedding.bin": {"dream_queries": "dream_queries"},
    "stable_diffusion_head.bin": {"unet.": "unet.", "vae.": "vae.", "projector.projector.": "condition_projector."},
}
# buffers old transformers saved (RoPE frequencies, CLIP position ids): we compute them instead
IGNORE = [r"rotary_emb\.inv_freq$", r"position_ids$"]
# The official save leaves the plugins out of pytorch_model.bin; a file that has them anyway is not
# read twice: the plugins' own files are the source.
PLUGINS_IN_LLM = ("model.clip_vision_embedding.", "model.dream_embedding.", "stable_diffusion_head.")

# The official prompt format (omni/conversation/conversation.py, "vicuna_v1.1", as FastChat's): the
# one its chat data and its instructed documents (the SFT's MMC4 instructions) are written in. A
# given image is read (a chat's layout); text-to-image puts the dream slot right after BOS + prompt.
VICUNA_V1_1 = PromptFormat(
    system="A chat between a curious user and an artificial intelligence assistant. The assistant gives "
           "helpful, detailed, and polite answers to the user's questions.",
    question="<image>{question}", caption_sep="")

# How the official scripts sample each released model (all with diffusers' DDPMScheduler built from
# SD 2.1-base's scheduler config):
# - dreamllm-7b: omni/eval/text2img (scripts/eval/text2img/eval_coco_zero_shot_clip8_select.sh), the
#   COCO FID runs of the paper: 150 steps, guidance 2.0, the empty prompt as CFG's null. (The CLI
#   pipeline, projects/dreamllm/cli_stable_diffusion_pipeline.py, runs 100 steps at 7.5.)
# - dreamllm-7b-aesthetic: projects/dreamllm/inference.py, the demo: 150 steps, guidance 3.5, a
#   quality prefix before every prompt and a negative prompt as CFG's null.
NEGATIVE = ("ugly,duplicate,morbid,mutilated,tranny,mutated hands,poorly drawn hands,blurry,bad anatomy,"
            "bad proportions,extra limbs,cloned face,disfigured,missing arms,extra legs,mutated hands,"
            "fused fingers,too many fingers,unclear eyes,lowers,bad anatomy,bad hands,text,error,missing "
            "fingers,extra digit,fewer digits,cropped,worst quality,low quality,normal quality,jpeg "
            "artifacts,signature,watermark,username,blurry,bad feet,gettyimages")
SAMPLING = {
    "dreamllm-7b": dict(sampler="ddpm", steps=150, guidance=2.0, prefix="", negative=""),
    "dreamllm-7b-aesthetic": dict(sampler="ddpm", steps=150, guidance=3.5,
                                  prefix="(best quality,extremely detailed) ", negative=NEGATIVE),
}
# and answers: omni/eval/vqa/vqa_inference.py decodes with 5 beams (or samples at temperature 0.2),
# up to 1024 new tokens, the model in bf16 (l.110-137, 293); text-to-image runs in fp32
# (projects/dreamllm/inference.py:58; omni/eval/text2img/ddp_sample_coco.py:79 leaves bf16 out)
BEAMS, MAX_NEW_TOKENS = 5, 1024
# The paper's COCO FID: 8 seeds per caption (42-49), each image scored by CLIP ViT-L/14's
# logits_per_image against the caption, the best kept (scripts/eval/text2img/
# eval_coco_zero_shot_clip8_select.sh; omni/eval/text2img/ddp_sample_coco.py, select_image)
BEST_OF = dict(n=8, seed=42, scorer=WEIGHTS / "clip-vit-large-patch14")


# ---------------------------------------------------------------------------------------- VQA
# The official VQA evaluation (scripts/eval/vqa/eval_vqa.sh -> omni/eval/vqa/vqa_inference.py, at
# RunpeiDong/DreamLLM 9dc7677): the eval template's system message starts with a space, which the
# training template's lacks (omni/utils/conversation.py:263 against omni/conversation/
# conversation.py:122); the user's turn is system_prompt + image + question + prompt, with no
# separators (l.190-206); the reply opens with the post-prompt after "ASSISTANT: ", and only what
# the model writes after it is the answer.
EVAL_FORMAT = replace(VICUNA_V1_1, system=" " + VICUNA_V1_1.system, question="{question}")


@dataclass(frozen=True)
class VQAProtocol:
    system_prompt: str = ""   # in the user's turn, before the image
    prompt: str = ""          # after the question (a caption task has no question)
    post_prompt: str = ""     # the reply's first words
    task: str = "vqa"         # "vqa" | "caption" | "pope" | "mmbench" | "ocr": how the answer is cut
    clip: bool = False        # --clip True: "." and '"' dropped, the first comma chunk, lower case
    beams: int = BEAMS        # 1: sampled at temperature 0.2 (--beamsearch False: POPE)
    known_first: bool = False  # VizWiz: "... Is the answer can be known?" first; "no" in it: unanswerable
    pad_square: bool = False   # --img_aug padding_square_resize: the long side to 224, padded black


ANSWER = "Based on the image, please answer the question."
ONE_WORD = "Please provide an accurate answer within one word."
# eval_vqa.sh's blocks by its line numbers; the shell passes the strings unquoted twice, so its
# "The short answer '\(one word\)' is:" arrives as below (eval_dreamllm.py:27-42, multi_hardware_eval.py)
SHORT = "The short answer (one word) is:"
PROTOCOLS = {
    "coco-caption": VQAProtocol("Based on the image, give the image caption briefly.",  # l.2-15
                                "Please summarize object in one sentence within 10 words.",
                                "The image depicts", task="caption"),
    "nocaps": VQAProtocol("", "Please summarize object briefly in one sentence within 5 words.",  # l.17-28
                          task="caption"),
    "image2paragraph": VQAProtocol("Based on the image, please describe the image in detail.",  # l.30-43
                                   "Please describe the image in detail.", "The image depicts",
                                   task="caption"),
    "vqav2": VQAProtocol(),  # sub-val, l.45-59: its prompts commented out
    "vqav2-testdev": VQAProtocol(ANSWER, ONE_WORD, SHORT, clip=True),  # l.61-75
    "textvqa": VQAProtocol(ANSWER, ONE_WORD, "The answer is:", clip=True),  # l.77-91
    "mmbench": VQAProtocol("This is an exam, please answer according to the image, hint and question.",
                           "Please provide an accurate and detailed answer.", task="mmbench"),  # l.93-105
    "mm-vet": VQAProtocol("This is an exam, please answer according to the image and question.",  # l.107-119
                          "Please provide an accurate, detailed and comprehensive answer."),
    "vizwiz": VQAProtocol(known_first=True),  # val, l.121-130
    "vizwiz-test": VQAProtocol(ANSWER, ONE_WORD, "The answer is:", clip=True, known_first=True),  # l.132-145
    "okvqa": VQAProtocol("", "Please provide an accurate and brief answer within one word.", SHORT,  # l.147-160
                         clip=True),
    "docvqa": VQAProtocol(pad_square=True),  # l.165-174
    "infographicvqa": VQAProtocol(pad_square=True),  # l.176-185
    "ocr": VQAProtocol(task="ocr", pad_square=True),  # l.188-197
    "pope": VQAProtocol("Based on the image, please objectively and accurately indicate whether the "  # l.200-236
                        "object exists.", "", "The answer is:", task="pope", beams=1),
}
CAPTION_PROMPT = "please provide an accurate and concise description of the given image."  # l.152-160


def pad_square(image, size=224):  # aspect kept, the long side to `size`, black to the right and below
    w, h = image.size  # the short side truncated, as vqa_inference.py's resize_image (l.59-76)
    w, h = (size, max(1, int(size / (w / h)))) if w > h else (max(1, int(size * (w / h))), size)
    image = image.convert("RGB").resize((w, h), Image.BICUBIC)
    square = Image.new("RGB", (size, size))
    square.paste(image)
    return square


def cut(answer, protocol):  # the answer as the official scripts keep it (l.170, 210-213; POPE's reader)
    if protocol.clip:
        answer = answer.replace(".", "").replace('"', "").split(",")[0].lower()
    if protocol.task == "caption":
        answer = answer.capitalize()
    if protocol.task == "pope":  # eval_utils.py:8-71: the first sentence's words; a no among them
        words = answer.split(".")[0].replace(",", "").split(" ")
        answer = "no" if {"No", "not", "no"} & set(words) else "yes"
    return answer


def ask(model, image, question, protocol, max_new_tokens=MAX_NEW_TOKENS, generator=None):
    # One benchmark item as eval_vqa.sh asks it of the release: -> (the answer as scored, as written)
    p = PROTOCOLS[protocol]
    image = pad_square(image) if p.pad_square else image
    kw = dict(beams=p.beams, max_new_tokens=max_new_tokens, prompts=EVAL_FORMAT, generator=generator,
              temperature=0.0 if p.beams > 1 else 0.2, progress=False)
    if p.known_first:  # the first pass: no system prompt, no prompt, no post-prompt
        known = model.answer(image, f"<image>{question}Is the answer can be known?", **kw)
        if "no" in known.lower():
            return "unanswerable", known
    if p.task == "caption":
        message = f"{p.system_prompt}<image>{p.prompt or CAPTION_PROMPT}"
    else:
        message = f"{p.system_prompt}<image>{question}{p.prompt}"
    written = model.answer(image, message, answer_start=p.post_prompt, **kw)
    return cut(written, p), written


def _missing(folder, names, download):
    if missing := [n for n in names if not (Path(folder) / n).is_file()]:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{Path(folder) / missing[0]}: missing{more}; download it with `{download}`")


def _tokenizer(folder):
    # tokenizer.json if there is one (python -m weights.convert tokenizer FOLDER writes it once), else
    # the same tokenizer converted in memory from tokenizer.model + added_tokens.json (a few seconds)
    if (folder / "tokenizer.json").is_file():
        return Tokenizer.from_file(str(folder / "tokenizer.json"))
    _missing(folder, ["tokenizer.model", "added_tokens.json"], DOWNLOAD)
    from weights import convert
    try:
        added = {str(k): int(v) for k, v in json.loads((folder / "added_tokens.json").read_text()).items()}
        legacy = read_config(folder, "tokenizer_config.json").get("legacy") is not False \
            if (folder / "tokenizer_config.json").is_file() else True
        return convert.sentencepiece_to_tokenizer_json(folder / "tokenizer.model", added, legacy)
    except (ValueError, AttributeError, convert.ConvertError) as e:
        raise CheckpointError(f"{folder}: the tokenizer cannot be read ({e})") from None


def _plugin_config(folder, hf):
    # the few plugin settings that change the architecture; anything else than the release's fails here
    plugins = hf.get("plugins_init_kwargs") or {}
    for name in ("clip_vision_embedding", "stable_diffusion_head"):
        kw = plugins.get(name) or {}
        if kw.get("projector_type", "linear") != "linear" or kw.get("projector_depth", 1) != 1:
            raise CheckpointError(f"{folder / 'config.json'}: {name} has a {kw.get('projector_type')} projector of "
                                  f"depth {kw.get('projector_depth')}; only the release's linear one is supported")
    if (plugins.get("clip_vision_embedding") or {}).get("use_additional_post_layernorm"):
        raise CheckpointError(f"{folder / 'config.json'}: use_additional_post_layernorm is not supported")
    return (plugins.get("clip_vision_embedding") or {}).get("select_layer", -2)


def _read(path, prefixes, dtype, device):
    keep = (lambda k: not k.startswith(PLUGINS_IN_LLM)) if path.name == "pytorch_model.bin" else (lambda k: True)
    out = {}
    for k, v in read_state_dict([path], dtype=dtype, device=device, keep=keep).items():
        head = next((p for p in prefixes if k.startswith(p)), None)
        out[f"{path.name}/{k}" if head is None else prefixes[head] + k[len(head):]] = v
    return out


def load_official(folder, device="cpu", dtype=torch.bfloat16, clip_config="clip-vit-large-patch14",
                  sd="sd-2.1-base", **config) -> DreamLLM:
    """The release folder -> a DreamLLM with the official prompt formats. The LLM's config comes from
    config.json; CLIP's and SD's from presets (clip_config, sd: names or configs; tests pass small ones),
    since the release names them by hub path only. `config` overrides DreamConfig fields."""
    folder = Path(folder)
    _missing(folder, ["config.json", *LAYOUT], DOWNLOAD)
    hf = read_config(folder)
    try:  # a LLaMA config with DreamLLM's fields added (model_type "dreamllm")
        llm_config = llama.LlamaConfig.from_hf(dict(hf, model_type="llama"))
    except (KeyError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{folder / 'config.json'}: not a LLaMA config ({e!r})") from None
    select_layer, tokenizer = _plugin_config(folder, hf), _tokenizer(folder)

    state = {}
    for name, prefixes in tqdm(LAYOUT.items(), desc="reading", unit="file", leave=False, disable=None):
        state |= _read(folder / name, prefixes, dtype, device)
    if "dream_queries" in state and state["dream_queries"].ndim == 3:
        state["dream_queries"] = state["dream_queries"][0]  # (1, K, D) -> (K, D)
    # Old diffusers files name the VAE attention query/key/value/proj_attn (unet.load_vae's rename)
    state = {re.sub(r"^(vae\..*attentions\.\d+)\.(query|key|value|proj_attn)\.",
                    lambda m: f"{m[1]}.{unet._OLD_VAE_ATTN[m[2]]}.", k): v for k, v in state.items()}
    n_queries = state["dream_queries"].shape[0] if "dream_queries" in state else 64

    vision = clip.PRESETS[clip_config] if isinstance(clip_config, str) else clip_config
    vision = replace(vision, text=None, projection_dim=None)  # the bare CLIPVisionModel
    sd = unet.PRESETS[sd] if isinstance(sd, str) else sd
    dream = replace(DreamConfig(n_queries=n_queries, clip_layer=select_layer, image_size=512), **config)
    with torch.device("meta"):  # no memory until the files' tensors are assigned
        backbones = llama.Llama(llm_config), clip.CLIP(vision), unet.build_unet(sd), unet.build_vae(sd)
    with torch.random.fork_rng(devices=[]):  # DreamLLM's own parts are drawn, then overwritten: RNG untouched
        model = DreamLLM(*backbones, sd["scheduler"], tokenizer, dream, prompts=VICUNA_V1_1)
    assign(model, state, folder, ignore=IGNORE)
    model.llm.tie_weights()
    if unapplied := _generation_config(folder):
        print(f"note: {folder / 'generation_config.json'} sets {unapplied}: the official scripts' "
              "generate() applies them, answer() does not (docs/release.md)", file=sys.stderr)
    return model.eval()


# transformers' generate() reads a checkpoint's generation_config.json; these fields change nothing
# a DreamLLM answer does (ids we read from the tokenizer; max_length: max_new_tokens wins)
GENERATION_READ = {"bos_token_id", "eos_token_id", "pad_token_id", "transformers_version",
                   "_from_model_config", "max_length"}


def _generation_config(folder):  # -> the decoding settings of the file that answer() leaves out
    path = Path(folder) / "generation_config.json"
    found = read_config(folder, path.name) if path.is_file() else {}
    return {k: v for k, v in found.items() if k not in GENERATION_READ}


# ----------------------------------------------------------------------------------------------------
# The paper's baseline: Stable Diffusion 2.1-base with its own text encoder (a diffusers pipeline
# folder: text_encoder/ a CLIPTextModel, tokenizer/ CLIP's BPE files, unet/, vae/, scheduler/)

SD_DOWNLOAD = "python -m weights.download sd-2.1-base"
SD_FILES = ["text_encoder/config.json", "tokenizer/vocab.json", "tokenizer/merges.txt", "unet/config.json",
            "vae/config.json", "scheduler/scheduler_config.json"]
# CLIP's word pattern: its special tokens, English contractions, letter runs, single digits, other symbols
CLIP_WORDS = r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""


def clip_tokenizer(folder, length=77):
    """CLIP's BPE from vocab.json + merges.txt, as the official CLIPTokenizer: NFC, whitespace runs to one
    space, lowercase; words cut by CLIP's pattern, written as bytes, "</w>" closing each word; then
    <|startoftext|> ... <|endoftext|>, truncated and padded to `length` with the folder's pad token."""
    folder = Path(folder)
    vocab = json.loads((folder / "vocab.json").read_text(encoding="utf-8"))
    lines = (folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split()) for line in lines if line and not line.startswith("#version")]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, end_of_word_suffix="</w>", unk_token="<|endoftext|>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(Regex(r"\s+"), " "),
                                           normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(CLIP_WORDS), behavior="removed", invert=True),  # keep the words
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|startoftext|>", "<|endoftext|>"])  # whole wherever they are written
    special = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        if (folder / name).is_file():
            special |= {k: v["content"] if isinstance(v, dict) else v
                        for k, v in json.loads((folder / name).read_text()).items() if k.endswith("_token")}
    pad = special.get("pad_token") or "<|endoftext|>"  # SD 2.x pads with "!", SD 1.x with <|endoftext|>
    tok.add_special_tokens([pad])  # a special token: so a "!" in SD 2.x's prompts is the bare "!", as there
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]

    def encode(texts):  # -> (B, length) ids
        ids = [[bos] + e.ids[:length - 2] + [eos] for e in tok.encode_batch(texts, add_special_tokens=False)]
        return torch.tensor([row + [vocab[pad]] * (length - len(row)) for row in ids])
    return encode


class StableDiffusion:
    # text -> image with SD's own text encoder: the context is the text tower's last hidden states over
    # all 77 tokens (pads included, no mask, as SD was trained), CFG against the empty prompt's
    def __init__(self, folder, device="cpu", dtype=torch.float32):
        folder = Path(folder)
        _missing(folder, SD_FILES, SD_DOWNLOAD)
        self.text_encoder = clip.load(folder / "text_encoder", device, dtype)
        self.tokenize = clip_tokenizer(folder / "tokenizer", self.text_encoder.config.text.n_positions)
        self.unet, self.vae = unet.load_unet(folder, device, dtype), unet.load_vae(folder, device, dtype)
        self.scheduler_config = read_config(folder / "scheduler", "scheduler_config.json")
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def text_to_image(self, prompt, num_images=1, steps=50, guidance=7.5, sampler="ddim", generator=None,
                      progress=True, image_size=512, negative=""):
        ids = self.tokenize([negative, prompt]).to(self.device)  # CFG's null: the negative prompt
        null, cond = self.text_encoder.text_hidden_states(ids).to(self.dtype).chunk(2)  # (1, 77, C) each
        return sample_cfg(self.unet, self.vae, self.scheduler_config, cond.expand(num_images, -1, -1), null,
                          image_size, steps, guidance, sampler, generator, progress, desc="plain SD")
