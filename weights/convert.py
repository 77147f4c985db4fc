"""Turning official files into the formats this project writes, once, after downloading them.

    python -m weights.convert tokenizer SRC_DIR             # tokenizer.model (+ added_tokens.json) -> tokenizer.json
    python -m weights.convert safetensors SRC_DIR [DST_DIR] # pytorch_model*.bin -> model*.safetensors

The tokenizer: LLaMA, Vicuna and DreamLLM ship a SentencePiece `tokenizer.model`. The product may not
import sentencepiece or protobuf, so we read the model's protobuf bytes by hand (a varint and
length-prefix reader, ~30 lines) and build the same tokenizer with the `tokenizers` library: a BPE
over the SentencePiece pieces, merges ranked by the merged piece's score, UTF-8 byte fallback for
anything else, spaces written as "▁" with one "▁" put in front of the text.

The weights: Vicuna's shards are pickled `.bin` files. We read each with `torch.load(weights_only=True,
mmap=True)` (never unpickling arbitrary objects) and write it out as safetensors, one shard at a time,
so peak memory is about one shard.

The original single-file Stable Diffusion checkpoints (`v2-1_512-ema-pruned.safetensors`, the CompVis
LDM layout) load into unet.py's UNet and VAE through `load_sd_checkpoint`: a key rename derived from
the config's block structure, not a table.
"""
import argparse
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

import unet
from plumbing.checkpoint import CheckpointError, assign, read_state_dict, weight_files


class ConvertError(Exception):
    pass


# ------------------------------------------------------------------------------------------------
# SentencePiece's ModelProto, read by hand
#
# Protobuf wire format: a message is a run of (tag, value); tag = field_number << 3 | wire_type, a
# varint. Wire type 0 is a varint, 1 eight bytes, 2 a varint length then that many bytes (strings and
# sub-messages), 5 four bytes (floats). The field numbers below are sentencepiece_model.proto's.

SPACE = "▁"  # U+2581, SentencePiece's visible space
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6  # SentencePiece.Type
MODEL_TYPES = {1: "unigram", 2: "bpe", 3: "word", 4: "char"}            # TrainerSpec.ModelType


def _varint(buf, i):
    value = shift = 0
    while True:
        if i >= len(buf):
            raise ValueError("truncated varint")
        byte = buf[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if byte < 0x80:
            return value, i


def _fields(buf):
    # yields (field_number, wire_type, value): an int for types 0/1/5 (raw bits), bytes for type 2
    i = 0
    while i < len(buf):
        tag, i = _varint(buf, i)
        field, wire = tag >> 3, tag & 7
        if wire == 0:
            value, i = _varint(buf, i)
        elif wire == 1:
            value, i = int.from_bytes(buf[i:i + 8], "little"), i + 8
        elif wire == 2:
            n, i = _varint(buf, i)
            value, i = buf[i:i + n], i + n
        elif wire == 5:
            value, i = int.from_bytes(buf[i:i + 4], "little"), i + 4
        else:
            raise ValueError(f"wire type {wire} (field {field}) does not occur in a SentencePiece model")
        if i > len(buf):
            raise ValueError(f"field {field} runs past the end")
        yield field, wire, value


def _int32(v):  # proto int32 fields are varints of the two's complement 64-bit value (-1 = 2**64 - 1)
    return v - (1 << 64) if v >= 1 << 63 else v


def read_sentencepiece(path):
    """The parts of a SentencePiece ModelProto that decide how text is cut into pieces."""
    path = Path(path)
    if not path.is_file():
        raise ConvertError(f"{path}: no such file (a SentencePiece tokenizer.model)")
    spec = dict(pieces=[], model_type=1, byte_fallback=False, unk_id=0, treat_whitespace_as_suffix=False,
                normalizer="nmt_nfkc", charsmap=b"", add_dummy_prefix=True, remove_extra_whitespaces=True,
                escape_whitespaces=True)  # proto defaults, for fields a file leaves out
    try:
        for field, wire, value in _fields(path.read_bytes()):
            if field == 1 and wire == 2:        # repeated SentencePiece pieces
                piece, score, kind = None, 0.0, NORMAL
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif f == 2 and w == 5:
                        score = struct.unpack("<f", v.to_bytes(4, "little"))[0]
                    elif f == 3 and w == 0:
                        kind = v
                if piece is None:
                    raise ValueError(f"piece {len(spec['pieces'])} has no text")
                spec["pieces"].append((piece, score, kind))
            elif field == 2 and wire == 2:      # TrainerSpec
                for f, w, v in _fields(value):
                    if w != 0:
                        continue
                    key = {3: "model_type", 24: "treat_whitespace_as_suffix", 35: "byte_fallback", 40: "unk_id"}.get(f)
                    if key:
                        spec[key] = _int32(v) if key == "unk_id" else v
            elif field == 3 and wire == 2:      # NormalizerSpec
                for f, w, v in _fields(value):
                    if f == 1 and w == 2:
                        spec["normalizer"] = v.decode("utf-8")
                    elif f == 2 and w == 2:
                        spec["charsmap"] = v
                    elif w == 0 and f in (3, 4, 5):
                        spec[{3: "add_dummy_prefix", 4: "remove_extra_whitespaces", 5: "escape_whitespaces"}[f]] = bool(v)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConvertError(f"{path}: not a SentencePiece model ({e})") from None
    if not spec["pieces"]:
        raise ConvertError(f"{path}: not a SentencePiece model (no pieces found)")
    return spec


def sentencepiece_to_tokenizer_json(model_path, added_tokens=None, legacy=True) -> Tokenizer:
    """A `tokenizers` Tokenizer giving the same ids as SentencePiece on `model_path` (a BPE model, as
    LLaMA's), plus `added_tokens` ({text: id}, as in added_tokens.json) kept whole wherever they occur.

    Text between added tokens: with `legacy` (transformers' name, and the default of its slow LLaMA
    tokenizer and of DreamLLM's) each stretch is encoded as sentencepiece would encode it alone, "▁"
    prefix included; without, only the start of the whole text gets the "▁" (transformers' legacy=False).
    encode() adds no <s>: as with dreamllm.byte_tokenizer, callers put BOS where the prompt format says.
    """
    spec = read_sentencepiece(model_path)
    where = Path(model_path)
    # What we reproduce exactly is LLaMA's setting; anything else fails loudly rather than silently differing.
    if MODEL_TYPES.get(spec["model_type"]) != "bpe":
        raise ConvertError(f"{where}: a {MODEL_TYPES.get(spec['model_type'], spec['model_type'])} model; only BPE (LLaMA's) is supported")
    if spec["charsmap"] or spec["normalizer"] not in ("identity", ""):
        raise ConvertError(f"{where}: normalization {spec['normalizer']!r}; only identity (LLaMA's) is supported")
    if spec["treat_whitespace_as_suffix"] or not spec["escape_whitespaces"]:
        raise ConvertError(f"{where}: whitespace as a suffix or unescaped is not supported")

    pieces = spec["pieces"]
    vocab = {piece: i for i, (piece, _, _) in enumerate(pieces)}
    # SentencePiece's BPE starts from characters and repeatedly merges the adjacent pair whose joined
    # string is a normal piece with the highest score. As ranked merges: every way to split a normal
    # piece into two normal pieces is a merge, ranked by the joined piece's score (ties: by its id).
    normal = {piece for piece, _, kind in pieces if kind == NORMAL}
    ranked = []
    for i, (piece, score, kind) in enumerate(pieces):
        if kind != NORMAL:
            continue
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-score, i, vocab[left], left, right))
    merges = [(left, right) for *_, left, right in sorted(ranked)]

    if not 0 <= spec["unk_id"] < len(pieces):
        raise ConvertError(f"{where}: unk_id {spec['unk_id']} is not a piece id")
    unk = pieces[spec["unk_id"]][0]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=True,
                               byte_fallback=bool(spec["byte_fallback"]), dropout=None))
    # Normalizing: SentencePiece (identity rule) optionally trims and collapses spaces, then puts one
    # "▁" in front of each text and writes every space as "▁". Text between two added tokens is
    # normalized on its own, as sentencepiece would be called on it alone.
    steps = []
    if spec["remove_extra_whitespaces"]:
        # (spaces only: a tab or newline is text to SentencePiece's identity rule)
        steps += [normalizers.Replace(Regex(r"\A +| +\z"), ""), normalizers.Replace(Regex(" {2,}"), " ")]
    if legacy or not spec["add_dummy_prefix"]:
        if spec["add_dummy_prefix"]:
            steps.append(normalizers.Prepend(SPACE))
        steps.append(normalizers.Replace(" ", SPACE))
    else:  # "first": the "▁" goes in front of the first stretch of text only, and only if it lacks one
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement=SPACE, prepend_scheme="first", split=False)
    tok.normalizer = normalizers.Sequence(steps)
    # Decoding: "▁" back to spaces, <0xNN> byte pieces back to UTF-8, and the prefix space dropped.
    dec = [decoders.Replace(SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if spec["add_dummy_prefix"]:
        dec.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(dec)

    # <unk>, <s>, </s> (and any control piece) are special: never produced from text by BPE, but kept
    # whole when written in text, as transformers' LLaMA tokenizers do. User-defined pieces (none in
    # LLaMA) are kept whole too, as ordinary tokens.
    tok.add_tokens([AddedToken(p, special=False, normalized=False) for p, _, k in pieces if k == USER_DEFINED])
    tok.add_special_tokens([AddedToken(p, special=True, normalized=False) for p, _, k in pieces if k in (UNKNOWN, CONTROL)])
    # The added tokens take the ids after the SentencePiece vocabulary, in the order of their ids;
    # tokenizers numbers new tokens consecutively, so gaps or clashes are errors.
    for text, want in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
        if text in vocab:
            if vocab[text] != want:
                raise ConvertError(f"added token {text!r}: id {want}, but the SentencePiece model has it as {vocab[text]}")
            continue
        tok.add_special_tokens([AddedToken(text, special=True, normalized=False)])
        got = tok.token_to_id(text)
        if got != want:
            raise ConvertError(f"added token {text!r}: id {want} in added_tokens.json, but it would get {got} "
                               f"(ids must run on from {len(pieces)} without gaps)")
    return tok


def convert_tokenizer(src, force=False, legacy=True):
    src = Path(src)
    out = src / "tokenizer.json"
    if out.exists() and not force:
        raise ConvertError(f"{out}: exists; pass --force to overwrite it")
    added = None
    if (src / "added_tokens.json").is_file():
        try:
            added = json.loads((src / "added_tokens.json").read_text())
            added = {str(k): int(v) for k, v in added.items()}
        except (ValueError, AttributeError, TypeError) as e:
            raise ConvertError(f"{src / 'added_tokens.json'}: not a {{token: id}} JSON object ({e})") from None
    tok = sentencepiece_to_tokenizer_json(src / "tokenizer.model", added, legacy)
    tmp = out.with_name(out.name + ".tmp")
    tok.save(str(tmp))
    os.replace(tmp, out)  # a reader never sees a half-written tokenizer.json
    return out


# ------------------------------------------------------------------------------------------------
# pytorch_model*.bin -> model*.safetensors

def _safetensors_name(name):
    # pytorch_model-00001-of-00002.bin -> model-00001-of-00002.safetensors; pytorch_model.bin -> model.safetensors
    return re.sub(r"^pytorch_model", "model", name).removesuffix(".bin") + ".safetensors"


def _read_bin(path):
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap" not in str(e):  # only files from torch < 1.6 (not zip) cannot be memory-mapped
                raise
            return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch.load raises many kinds on a damaged or foreign file
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise ConvertError(f"{path}: cannot be read ({reason}); is it truncated? download it again") from None


def bin_to_safetensors(src, dst=None, force=False):
    """Write `src`'s pytorch_model.bin (or its shards) as safetensors in `dst` (default: `src`), with
    the same shard split, an index naming every key, and the folder's other files copied over.
    Returns the paths written."""
    src = Path(src)
    dst = Path(dst) if dst is not None else src
    files = weight_files(src, ["pytorch_model.bin"])  # the file, or the shards its index names (all present)
    if not (src / "config.json").is_file():
        raise ConvertError(f"{src / 'config.json'}: missing (a model folder holds config.json beside the weights)")
    existing = [p for p in ("model.safetensors", "model.safetensors.index.json") if (dst / p).exists()]
    if existing and not force:
        raise ConvertError(f"{dst / existing[0]}: exists; pass --force to overwrite it")
    dst.mkdir(parents=True, exist_ok=True)

    written, weight_map, total = [], {}, 0
    for path in files:
        state = _read_bin(path)
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise ConvertError(f"{path}: does not hold a flat dict of tensors")
        out, seen = {}, set()
        for key, t in state.items():
            if key.endswith("rotary_emb.inv_freq"):  # a buffer old transformers saved; we compute RoPE
                continue
            # safetensors stores each tensor's bytes once and refuses tensors that share memory (tied
            # embeddings saved by torch.save share one storage): those get their own copy.
            storage = t.untyped_storage().data_ptr()
            out[key] = t.clone() if storage in seen else t.contiguous()
            seen.add(storage)
        name = _safetensors_name(path.name)
        tmp = dst / (name + ".tmp")
        save_file(out, str(tmp), metadata={"format": "pt"})  # "pt": what transformers checks on load
        os.replace(tmp, dst / name)
        written.append(dst / name)
        weight_map.update({k: name for k in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del state, out  # let this shard go before the next is read

    if len(files) > 1:  # sharded in, sharded out, with the index that names every key
        index = dst / "model.safetensors.index.json"
        tmp = dst / (index.name + ".tmp")
        tmp.write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
        os.replace(tmp, index)
        written.append(index)
    if dst.resolve() != src.resolve():  # config.json, tokenizer files, ...: everything but the old weights
        for f in src.iterdir():
            if f.is_file() and not f.name.startswith("pytorch_model") and not (dst / f.name).exists():
                shutil.copy2(f, dst / f.name)
    return written


# ------------------------------------------------------------------------------------------------
# The original single file (CompVis LDM layout). Its UNet numbers sub-modules: input_blocks.{i}.{0: resnet
# or downsampler, 1: transformer}, middle_block.{0,1,2}, output_blocks.{i}.{0: resnet, 1: transformer,
# last: upsampler}; inside a resnet the layers are numbered, inside a transformer the names are ours.
# So a key renames as (module prefix -> our prefix) + (leaf rename); the prefixes follow from the config.
_LDM_UNET_LEAVES = {"in_layers.0": "norm1", "in_layers.2": "conv1", "emb_layers.1": "time_emb_proj",
                    "out_layers.0": "norm2", "out_layers.3": "conv2", "skip_connection": "conv_shortcut"}
_LDM_VAE_LEAVES = {"nin_shortcut": "conv_shortcut", "norm": "group_norm", "q": "to_q", "k": "to_k",
                   "v": "to_v", "proj_out": "to_out.0"}


def _ldm_unet_prefixes(c: unet.UNetConfig):
    L, n = c.layers_per_block, len(c.channels)
    p = {"time_embed.0": "time_embedding.linear_1", "time_embed.2": "time_embedding.linear_2",
         "input_blocks.0.0": "conv_in", "out.0": "conv_norm_out", "out.2": "conv_out",
         "middle_block.0": "mid_block.resnets.0", "middle_block.1": "mid_block.attentions.0",
         "middle_block.2": "mid_block.resnets.1"}
    i = 1  # input_blocks.0 is conv_in
    for b in range(n):
        for j in range(L):
            p[f"input_blocks.{i}.0"] = f"down_blocks.{b}.resnets.{j}"
            p[f"input_blocks.{i}.1"] = f"down_blocks.{b}.attentions.{j}"
            i += 1
        if b < n - 1:
            p[f"input_blocks.{i}.0.op"] = f"down_blocks.{b}.downsamplers.0.conv"
            i += 1
    for b in range(n):  # output_blocks run from the lowest level up, like up_blocks
        for j in range(L + 1):
            i = b * (L + 1) + j
            p[f"output_blocks.{i}.0"] = f"up_blocks.{b}.resnets.{j}"
            p[f"output_blocks.{i}.1"] = f"up_blocks.{b}.attentions.{j}"
            if j == L and b < n - 1:  # the upsampler comes after the transformer, if the level has one
                p[f"output_blocks.{i}.{1 + c.cross_attn[n - 1 - b]}.conv"] = f"up_blocks.{b}.upsamplers.0.conv"
    return p


def _ldm_vae_prefixes(c: unet.VAEConfig):
    n = len(c.channels)
    p = {"quant_conv": "quant_conv", "post_quant_conv": "post_quant_conv"}
    for part in ("encoder", "decoder"):
        for ldm, ours in (("conv_in", "conv_in"), ("conv_out", "conv_out"), ("norm_out", "conv_norm_out"),
                          ("mid.block_1", "mid_block.resnets.0"), ("mid.attn_1", "mid_block.attentions.0"),
                          ("mid.block_2", "mid_block.resnets.1")):
            p[f"{part}.{ldm}"] = f"{part}.{ours}"
    for i in range(n):
        for j in range(c.layers_per_block + 1):
            p[f"encoder.down.{i}.block.{j}"] = f"encoder.down_blocks.{i}.resnets.{j}"
            p[f"decoder.up.{n - 1 - i}.block.{j}"] = f"decoder.up_blocks.{i}.resnets.{j}"  # up.0 is the top level
        p[f"encoder.down.{i}.downsample.conv"] = f"encoder.down_blocks.{i}.downsamplers.0.conv"
        p[f"decoder.up.{n - 1 - i}.upsample.conv"] = f"decoder.up_blocks.{i}.upsamplers.0.conv"
    return p


def _rename_ldm(state, prefixes, leaves):
    """Each key: its longest module prefix found in `prefixes` is replaced, then the rest via `leaves`.
    Keys no rule covers keep their name, so that assign() reports them as unexpected."""
    out = {}
    for key, value in state.items():
        parts = key.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            head, rest = ".".join(parts[:cut]), parts[cut:]
            if head in prefixes:
                leaf = ".".join(rest[:-1])
                key = ".".join([prefixes[head]] + ([leaves.get(leaf, leaf)] if leaf else []) + rest[-1:])
                break
        out[key] = value
    return out


def load_sd_checkpoint(path, unet_config, vae_config, device="cpu", dtype=torch.float32):
    """An original single-file SD checkpoint (v1-5-pruned-emaonly.safetensors, v2-1_512-ema-pruned.safetensors)
    -> (UNet, VAE). Configs: diffusers config dicts, presets ("sd-1.5", "sd-2.1-base") or our configs.
    model.diffusion_model.* and first_stage_model.* are used; the text encoder (cond_stage_model.*), the
    schedule buffers and a full file's separate model_ema.* copy are ignored. Pickled .ckpt files are not read."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such file (expected an original single-file Stable Diffusion checkpoint)")
    try:
        uc = unet.as_config(unet_config, unet.UNetConfig, "unet")
        vc = unet.as_config(vae_config, unet.VAEConfig, "vae")
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: bad config given for it: {e}") from None
    # read only the UNet and the VAE: the file also holds the text encoder (1.4 GB in fp32 for SD 2.x)
    state = read_state_dict([path], dtype=dtype, device=device,
                            keep=lambda k: k.startswith(("model.diffusion_model.", "first_stage_model.")))

    def part(prefix):
        return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    unet_sd, vae_sd = part("model.diffusion_model."), part("first_stage_model.")
    if not unet_sd or not vae_sd:
        raise CheckpointError(f"{path}: no model.diffusion_model.* or first_stage_model.* keys; "
                              "not an original Stable Diffusion checkpoint")
    vae_sd = _rename_ldm(vae_sd, _ldm_vae_prefixes(vc), _LDM_VAE_LEAVES)
    for k, v in vae_sd.items():  # the VAE attention's q, k, v, proj_out are 1x1 convs there, Linear here
        if ".attentions.0.to_" in k and v.ndim == 4:
            vae_sd[k] = v.flatten(1)
    with torch.device("meta"):
        denoiser, vae = unet.UNet(uc), unet.VAE(vc)
    assign(denoiser, _rename_ldm(unet_sd, _ldm_unet_prefixes(uc), _LDM_UNET_LEAVES), f"{path} (model.diffusion_model.*)")
    assign(vae, vae_sd, f"{path} (first_stage_model.*)")
    return denoiser.eval(), vae.eval()


# ------------------------------------------------------------------------------------------------

def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m weights.convert", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("tokenizer", help="SRC_DIR/tokenizer.model (+ added_tokens.json) -> SRC_DIR/tokenizer.json")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("--force", action="store_true", help="overwrite an existing tokenizer.json")
    p.add_argument("--no-legacy", dest="legacy", action="store_false",
                   help="text right after an added token gets no '▁' prefix (transformers' legacy=False)")
    p = sub.add_parser("safetensors", help="pytorch_model*.bin in SRC_DIR -> model*.safetensors in DST_DIR")
    p.add_argument("src", metavar="SRC_DIR")
    p.add_argument("dst", metavar="DST_DIR", nargs="?", help="where to write (default: SRC_DIR)")
    p.add_argument("--force", action="store_true", help="overwrite existing model*.safetensors")
    args = parser.parse_args(argv)
    try:
        if args.command == "tokenizer":
            out = convert_tokenizer(args.src, args.force, args.legacy)
            print(f"wrote {out} ({Tokenizer.from_file(str(out)).get_vocab_size()} tokens)")
        else:
            for path in bin_to_safetensors(args.src, args.dst, args.force):
                print(f"wrote {path}")
    except (ConvertError, CheckpointError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
