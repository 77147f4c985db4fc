"""The peers' objective (plumbing/alignment.py): GILL's mapper as the bridge, the alignment loss, and training
by it from train.py."""
import json

import pytest
import torch

import dreamllm
import train
from plumbing import alignment, checkpoint
from shapes import data

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py
FAST = ["--preset", "tiny-text", "--stage", "I-creation", "--device", "cpu", "--batch-size", "4",
        "--log-every", "1", "--bridge", "mapper"]


def pairs(n=3):
    examples = [data.example("t2i", 0, i) for i in range(n)]
    return examples, [text.split(data.IMAGE_TOKEN)[0].strip() for text, *_ in examples]


def test_the_mapper_gives_the_text_encoders_shape_and_the_unet_reads_it():
    m = dreamllm.build("tiny-text", bridge="mapper")
    L, C = m.clip.config.text.n_positions, m.unet.config.context_dim
    assert m.condition("a red circle").shape == (1, L, C)  # L = 32 text positions, not K = 8
    examples, _ = pairs()
    batch = m.collate(examples)
    assert m.slot_conditions(batch["input_ids"]).shape == (3, L, C)
    # the plain model: the K projected states, and no mapper
    plain = dreamllm.build("tiny-text")
    assert plain.condition_mapper is None and plain.condition("a").shape == (1, 8, C)


def test_text_ids_are_bos_caption_eos_then_padding():
    tok = dreamllm.byte_tokenizer()  # no <pad>: padded with </s>, as SD's CLIP pads
    ids = alignment.text_ids(tok, ["ab", "a" * 50], 8)
    bos, eos = tok.token_to_id("<s>"), tok.token_to_id("</s>")
    assert ids[0].tolist() == [bos, ord("a"), ord("b"), eos, eos, eos, eos, eos]
    assert ids.shape == (2, 8) and ids[1, 0] == bos and ids[1, -1] == eos  # cut to fit


def test_alignment_loss_is_the_distance_to_the_text_encoders_states():
    m = dreamllm.build("tiny-text", bridge="mapper", objective="align", cond_dropout=0.0)
    examples, captions = pairs()
    batch = m.collate(examples, diffusion=False)
    losses = m(**batch, captions=(torch.arange(3), captions))
    assert losses["diffusion"] == 0 and "align" in losses
    ids = alignment.text_ids(m.tokenizer, captions, 32)
    target = m.clip.text_hidden_states(ids)
    c = m.slot_conditions(batch["input_ids"])
    assert losses["align"].item() == pytest.approx(((c - target) ** 2).mean().item(), rel=1e-5)
    assert alignment.distance(target, target) == 0
    assert alignment.distance(target, target, "cosine") == pytest.approx(0, abs=1e-6)
    assert alignment.distance(-target, target, "cosine") == pytest.approx(2, abs=1e-5)
    # with condition dropout p, the null is aligned to E("") at weight p
    m.config.cond_dropout = 0.25
    null = ((m.null_condition() - m.clip.text_hidden_states(alignment.text_ids(m.tokenizer, [""], 32)))
            ** 2).mean()
    both = m(**batch, captions=(torch.arange(3), captions))["align"]
    assert both.item() == pytest.approx(0.75 * losses["align"].item() + 0.25 * null.item(), rel=1e-5)


@pytest.mark.parametrize("null", ["queries", "patches"])
def test_both_objectives_share_the_null_where_it_is_one(null):
    # condition dropout's null and the alignment's are the queries after "" (dropout_null
    # "queries"): the LLM runs over "" once, and each loss is what it is computed alone
    m = dreamllm.build("tiny-text", bridge="mapper", objective="both", cond_dropout=0.5, dropout_null=null)
    examples, captions = pairs(4)
    batch = m.collate(examples)
    draws = m.draw_noise([torch.Generator().manual_seed(e) for e in range(4)])
    calls, condition = [], m.condition
    m.condition = lambda *a, **k: calls.append(a) or condition(*a, **k)
    losses = m(**batch, draws=draws, captions=(torch.arange(4), captions))
    assert len(calls) == (1 if null == "queries" else 2)
    c = m.slot_conditions(batch["input_ids"])
    assert losses["diffusion"].item() == pytest.approx(m.diffusion_loss(c, batch["vae_pixels"], draws).item(), rel=1e-5)
    assert losses["align"].item() == pytest.approx(m.alignment_loss(c, captions).item(), rel=1e-5)

def test_a_model_that_cannot_align_is_refused():
    with pytest.raises(ValueError, match="bridge 'mapper'"):
        dreamllm.build("tiny-text", objective="align")  # K states cannot meet L
    with pytest.raises(ValueError, match="no text tower"):
        dreamllm.build("tiny", bridge="mapper")
    with pytest.raises(ValueError, match="objective"):
        dreamllm.build("tiny-text", bridge="mapper", objective="regress")


def metrics(folder):
    return [json.loads(x) for x in (folder / "metrics.jsonl").read_text().splitlines()]


def test_training_by_alignment_moves_the_condition_to_the_text_states(tmp_path):
    # no UNet in the loop: the diffusion term is 0 and the alignment falls; the mapper is saved
    # with the condition projector's group and comes back with it
    train.main(FAST + ["--objective", "align", "--steps", "40", "--lr", "3e-3", "--out", str(tmp_path)])
    rows = metrics(tmp_path)
    assert all(r["diffusion"] == 0 for r in rows)
    first, last = sum(r["align"] for r in rows[:5]) / 5, sum(r["align"] for r in rows[-5:]) / 5
    assert last < 0.7 * first, (first, last)
    run = checkpoint.read_run(tmp_path)
    state = checkpoint.read_tensors(run, "model")
    assert any(k.startswith("condition_mapper.blocks.1.") for k in state)
    assert run["dream_config"]["objective"] == "align" and run["dream_config"]["bridge"] == "mapper"
    m = dreamllm.build("tiny-text", **run["dream_config"])
    m.load_trained_state(state)
    _, captions = pairs(4)
    ids = alignment.text_ids(m.tokenizer, captions, 32)
    with torch.no_grad():
        got = torch.cat([m.condition(c) for c in captions])
        fresh = torch.cat([dreamllm.build("tiny-text", bridge="mapper").condition(c) for c in captions])
        target = m.clip.text_hidden_states(ids)
    assert alignment.distance(got, target) < alignment.distance(fresh, target)


def test_both_objectives_log_both_terms_and_the_flags_are_checked(tmp_path, capsys):
    train.main(FAST + ["--objective", "both", "--align-weight", "0.5", "--steps", "2",
                       "--out", str(tmp_path / "both")])
    rows = metrics(tmp_path / "both")
    assert all(r["diffusion"] > 0 and r["align"] > 0 for r in rows)
    # the creation weight (stage I: 1) splits: loss = diffusion + 0.5 align
    assert rows[-1]["loss"] == pytest.approx(rows[-1]["diffusion"] + 0.5 * rows[-1]["align"], rel=1e-5)
    for bad, said in [(["--objective", "align", "--bridge", "projector"], "--bridge mapper"),
                      (["--align-weight", "-1"], "--align-weight"),
                      (["--align-distance", "l1"], "invalid choice")]:
        with pytest.raises(SystemExit) as e:
            train.parse_args(FAST + bad)
        assert e.value.code == 2 and said in capsys.readouterr().err
