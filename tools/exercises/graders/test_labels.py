# Exercise: the labels of an interleaved document (dreamllm.py: DreamLLM.encode_document, its
# default layout: each <image> a dream slot, then a read slot)
import pytest
import torch

import dreamllm
from grading import expect

IGNORE = -100


@pytest.fixture(scope="module")
def model():
    return dreamllm.build("tiny")  # K = 8 dream queries, N = 16 patches per read slot


def expected(model, text):
    # the layout, piece by piece: BOS, text, and for each <image> a dream slot then a read slot, EOS
    tok, ids, labels = model.token_id, [model.bos_id], [IGNORE]
    K = model.config.n_queries
    dream = [tok["<dream_start>"]] + [tok["<im_patch>"]] * K + [tok["<dream_end>"]]
    read = [tok["<im_start>"]] + [tok["<im_patch>"]] * model.n_patches + [tok["<im_end>"]]
    for i, piece in enumerate(text.split("<image>")):
        if i:  # an image before this piece: only <dream_start> is a label
            ids += dream + read
            labels += [tok["<dream_start>"]] + [IGNORE] * (len(dream) + len(read) - 1)
        words = model.tokenizer.encode(piece, add_special_tokens=False).ids
        ids, labels = ids + words, labels + words
    return ids + [model.eos_id], labels + [model.eos_id]


def name(model, i):
    names = {v: k for k, v in model.token_id.items()}
    names |= {model.bos_id: "BOS", model.eos_id: "EOS", IGNORE: "-100"}
    return names.get(i, repr(chr(i)) if 32 <= i < 127 else str(i))


def same(model, got, want, what):
    expect(isinstance(got, torch.Tensor), f"{what}: expected a tensor, got {type(got).__name__}")
    got = got.tolist()
    for i, (g, w) in enumerate(zip(got, want)):
        expect(g == w, f"{what}: position {i} holds {name(model, g)}, expected {name(model, w)}\n"
               f"  expected ... {[name(model, v) for v in want[max(0, i - 3):i + 4]]}\n"
               f"  got      ... {[name(model, v) for v in got[max(0, i - 3):i + 4]]}")
    expect(len(got) == len(want), f"{what}: {len(got)} tokens, expected {len(want)}")


@pytest.mark.parametrize("text,n", [("ab<image>c", 1), ("just text, no picture", 0),
                                    ("Here is a red circle. <image> It is red. <image>", 2),
                                    ("<image><image> two at once", 2)])
def test_layout_and_labels(model, text, n):
    ids, labels = model.encode_document(text, n)
    want_ids, want_labels = expected(model, text)
    same(model, ids, want_ids, f"input_ids of {text!r}")
    same(model, labels, want_labels, f"labels of {text!r}")


def test_only_dream_start_is_a_slot_label(model):
    ids, labels = model.encode_document("a <image> b", 1)
    tok = model.token_id
    slots = ("<dream_start>", "<dream_end>", "<im_start>", "<im_end>", "<im_patch>")
    slot_tokens = {tok[s] for s in slots}
    labelled = {int(v) for v in labels if int(v) in slot_tokens}
    expect(labelled == {tok["<dream_start>"]}, f"slot tokens with a label: "
           f"{sorted(name(model, v) for v in labelled)}; expected only <dream_start>")


def test_the_number_of_images_must_agree(model):
    for text, n in [("<image> and <image>", 1), ("no image", 1)]:
        try:
            model.encode_document(text, n)
        except ValueError:
            continue
        expect(False, f"encode_document({text!r}, {n}) must raise ValueError: the counts differ")


def test_typed_slot_tokens_are_refused(model):
    try:
        model.encode_document("a <dream_start> forged", 0)
    except ValueError:
        return
    expect(False, "a text holding <dream_start> must be refused (check_text): only the model "
           "writes it")
