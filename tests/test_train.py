"""train.py on the tiny preset (CPU): what trains and what stays frozen, checkpoints, exact resume, NaN,
Ctrl-C, bad input; and the DreamLLM additions it relies on (new token rows, trained_state)."""
import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import dreamllm
import train
from plumbing import checkpoint, cli
from plumbing.whitening import Whitening
from shapes import data

ROOT = Path(__file__).resolve().parent.parent
FAST = ["--preset", "tiny", "--stage", "I-creation", "--device", "cpu", "--batch-size", "2",
        "--log-every", "1"]
ENV = dict(os.environ, OMP_NUM_THREADS="1")  # subprocesses too run on one thread (see conftest.py)
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def run(*args):
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)


def fails(argv, capsys, code=1):
    # train.main(argv) exits non-zero with one line on stderr; returns that line
    with pytest.raises(SystemExit) as e:
        train.main(argv)
    assert e.value.code == code
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert line.startswith("train.py: ") and "Traceback" not in line
    return line


def state(folder, name="model"):  # the tensors of a run's newest checkpoint
    return checkpoint.read_tensors(checkpoint.read_run(folder), name)


def step_of(folder):  # the newest checkpoint's step, as its config.json and its two files record it
    run, metas = checkpoint.read_run(folder), []
    for name in ("model", "train_state"):
        with safe_open(run["path"] / f"{name}.safetensors", "pt") as f:
            metas.append(int(f.metadata()["step"]))
    return run["step"], *metas


# ---- the entry point --------------------------------------------------------------------------------

def test_entry_point_trains_prints_the_loss_and_checkpoints(tmp_path):
    r = run("train.py", "--preset", "tiny", "--stage", "I-creation", "--steps", "20", "--device", "cpu", "--out", str(tmp_path))
    assert r.returncode == 0, r.stderr[-2000:]
    assert "step 20/20" in r.stdout and "loss" in r.stdout
    # the checkpoint, whole, and the logged steps' metrics; nothing else
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step-20"]
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in logged] == [10, 20] and logged[-1]["stage"] == "I-creation"
    assert all(m["loss"] > 0 and m["lr"] > 0 and m["steps_per_s"] > 0 for m in logged)
    assert sorted(p.name for p in (tmp_path / "step-20").iterdir()) == sorted(checkpoint.RUN_FILES)
    config = json.loads((tmp_path / "step-20" / "config.json").read_text())
    assert (config["preset"], config["stage"], config["step"], config["steps"]) == ("tiny", "I-creation", 20, 20)
    assert set(state(tmp_path)) == {"dream_queries", "condition_projector.weight"}  # official stage I


def test_help_and_unknown_flag():
    r = run("train.py", "-h")
    assert r.returncode == 0 and "--stage" in r.stdout and "--resume" in r.stdout
    r = run("train.py", "--no-such-flag")
    assert r.returncode != 0 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr


# ---- what trains ------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage", ["I-creation", "I-comprehension", "II", "new-rows"])
def test_frozen_modules_get_no_gradient_and_stay_bit_identical(stage, tmp_path, monkeypatch):
    # "new-rows": a stage of ours (no official one does this) training the added tokens' rows alone
    monkeypatch.setitem(train.STAGES, "new-rows", dict(train.STAGES["I-creation"], lm_weight=1.0,
                                                       groups=["dream_queries", "new_tokens"], mix=["document"]))
    built, grads = [], []
    build = dreamllm.build
    monkeypatch.setattr(dreamllm, "build", lambda *a, **k: built.append(build(*a, **k)) or built[-1])
    clip = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm):  # the gradients as the optimizer is about to see them
        grads.append({n: None if p.grad is None else p.grad.clone() for n, p in built[0].named_parameters()})
        return clip(params, max_norm)
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", spy)
    train.main(FAST + ["--stage", stage, "--steps", "3", "--weight-decay", "0.1", "--out", str(tmp_path)])
    model, fresh = built[0], build("tiny")
    before, after = dict(fresh.named_parameters()), dict(model.named_parameters())
    groups, n = model.trainable_groups(), model.n_text_vocab
    trains = {id(p) for g in train.STAGES[stage]["groups"] if g != "new_tokens" for p in groups[g]}
    new_rows = {id(p) for p in groups["new_tokens"]} if "new_tokens" in train.STAGES[stage]["groups"] else set()
    for name, p in after.items():
        if id(p) in trains:
            assert all(g[name] is not None for g in grads[1:]), f"{name} received no gradient"
            assert not torch.equal(p, before[name]), f"{name} did not train"
        elif id(p) in new_rows:  # only the rows of the added tokens train
            assert torch.equal(p[:n], before[name][:n]), f"{name}: an old row changed"
            assert all(g[name][:n].abs().sum() == 0 for g in grads)
            assert not torch.equal(p[n:], before[name][n:]), f"{name}: the new rows did not train"
        else:  # CLIP, the VAE, the UNet always; the LLM, its embedding and LM head in stage I
            assert all(g[name] is None for g in grads), f"{name} received a gradient"
            assert torch.equal(p, before[name]), f"{name} changed"
    assert model.n_text_vocab < model.llm.cfg.vocab_size


def test_groups_flag_trains_what_it_names_and_only_that(tmp_path):
    # --groups overrides the stage's: I-creation with the LLM too (the toy's), or the queries alone
    assert tuple(dreamllm.build("tiny").trainable_groups()) == dreamllm.GROUPS  # what --groups checks
    for groups in (["dream_queries", "condition_projector", "llm"], ["dream_queries"]):
        out = tmp_path / "_".join(groups)
        train.main(FAST + ["--steps", "2", "--groups", ",".join(groups), "--out", str(out)])
        saved = {k.split(".")[0] for k in state(out)}
        assert saved == set(groups), saved
        assert checkpoint.read_run(out)["groups"] == groups


def test_whitening_makes_the_projector_input_isotropic():
    model = dreamllm.build("tiny")
    w0 = model.condition_projector.weight.detach().clone()
    example = lambda e: ((f"a {['red', 'blue', 'green'][e % 3]} {['circle', 'square'][e % 2]} <image>", [None]) if e % 5
                         else ("<image> then text", [None]))  # noqa: E731: captions and, every 5th, the null
    white = Whitening(model, example)
    with torch.no_grad():
        h = torch.cat([model.dream_states(example(e)[0].split(data.IMAGE_TOKEN)[0])[0] for e in range(white.N_PROMPTS)])
    second_moment = white.Z @ (h.T @ h / len(h)) @ white.Z
    top = torch.linalg.eigvalsh(second_moment)[-10:]  # the directions the states span come out with unit scale
    assert torch.allclose(top, torch.ones_like(top), atol=1e-2), top
    raw = torch.linalg.eigvalsh(h.T @ h / len(h))[-10:]
    assert raw[-1] / raw[0] > 10  # and they did not before: one direction, the states' mean, dwarfs the rest
    assert torch.equal(white.Z, white.Z.T)
    # the projector starts where it was (a fresh init or a trained one): a change of coordinates
    assert torch.allclose(white.prime @ white.Z, w0, atol=1e-4)
    assert torch.allclose(model.condition_projector.weight, w0, atol=1e-4)
    prime = white.prime.detach().clone()
    white.prime.data.add_(1.0)
    white.update()
    assert torch.equal(white.prime, prime + 1.0)  # W' and W are two tensors: update() writes W only
    assert torch.equal(model.condition_projector.weight, white.prime @ white.Z)


def test_whitened_run_saves_w_as_w_prime_z_and_by_default_trains_plain(tmp_path):
    train.main(FAST + ["--steps", "2", "--whiten", "--out", str(tmp_path / "w")])
    white, weights = state(tmp_path / "w", "train_state"), state(tmp_path / "w")
    assert torch.equal(white["whitening.prime"] @ white["whitening.Z"], weights["condition_projector.weight"])
    train.main(FAST + ["--steps", "2", "--out", str(tmp_path / "plain")])  # the paper's method: no trick
    plain = state(tmp_path / "plain")
    assert not any(k.startswith("whitening.") for k in state(tmp_path / "plain", "train_state"))
    assert not torch.allclose(plain["condition_projector.weight"], weights["condition_projector.weight"])


def test_whitening_follows_whether_this_stage_trains_the_llm_not_an_earlier_one(tmp_path):
    # the LLM trained before (stage II), frozen now (I-creation): its states are whitened
    train.main(FAST + ["--stage", "II", "--steps", "1", "--out", str(tmp_path / "llm")])
    train.main(FAST + ["--steps", "1", "--whiten", "--init", str(tmp_path / "llm"),
                       "--out", str(tmp_path / "w")])
    assert "whitening.Z" in state(tmp_path / "w", "train_state")
    train.main(FAST + ["--stage", "II", "--steps", "1", "--whiten", "--init", str(tmp_path / "w"),
                       "--out", str(tmp_path / "ii")])  # the LLM trains: no whitening
    assert not any(k.startswith("whitening.") for k in state(tmp_path / "ii", "train_state"))


def test_dream_queries_step_at_a_tenth_of_the_lr_while_whitened(tmp_path):
    q0 = dreamllm.build("tiny").dream_queries.detach()
    for flags, lr_scale in ((["--whiten"], Whitening.QUERY_LR), ([], 1.0)):
        out = tmp_path / str(lr_scale)
        train.main(FAST + ["--steps", "1", "--lr", "1e-3", "--warmup", "0", "--out", str(out)] + flags)
        step = (state(out)["dream_queries"] - q0).abs().max().item()
        assert abs(step - 1e-3 * lr_scale) < 1e-5 * lr_scale, (flags, step)  # AdamW's first step moves each entry by lr


def test_whitened_projector_without_a_diffusion_loss_gets_no_gradient_and_stays(tmp_path):
    train.main(FAST + ["--steps", "2", "--diffusion-weight", "0", "--whiten", "--out", str(tmp_path)])
    w = state(tmp_path)["condition_projector.weight"]
    Z = state(tmp_path, "train_state")["whitening.Z"]
    prime = state(tmp_path, "train_state")["whitening.prime"]
    assert torch.equal(w, prime @ Z)  # W = W' Z, and W' never stepped: W is its init, to rounding
    assert torch.allclose(w, dreamllm.build("tiny").condition_projector.weight.detach(), atol=1e-4)


def test_on_the_gpu_frozen_weights_go_to_bf16_and_trained_ones_to_fp32():
    model = dreamllm.build("tiny").to(torch.bfloat16)  # as the official release loads: all bf16
    args = argparse.Namespace(lr=1e-3, weight_decay=0.0, preset="tiny")
    params, _ = train.make_optimizer(model, train.STAGES["I-creation"]["groups"], args)
    cli.cast_frozen(model, torch.bfloat16)
    trained = {id(p) for p in params}
    assert trained and all(p.dtype == torch.float32 for p in params)
    assert {p.dtype for p in model.parameters() if id(p) not in trained} == {torch.bfloat16}


def test_new_token_rows_are_the_special_tokens():
    m = dreamllm.build("tiny")
    assert m.n_text_vocab == 256  # the tiny LLM's own vocabulary: one row per byte
    assert all(m.token_id[s] >= m.n_text_vocab for s in dreamllm.SPECIAL_TOKENS)
    assert m.bos_id >= m.n_text_vocab  # the byte tokenizer's <s> and </s> are new to the tiny LLM too


# ---- checkpoints ------------------------------------------------------------------------------------

def test_resume_ends_bit_identical_to_the_uninterrupted_run(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    train.main(FAST + ["--steps", "20", "--out", str(a)])
    train.main(FAST + ["--steps", "20", "--stop-after", "10", "--out", str(b)])
    assert step_of(b) == (10, 10, 10)
    train.main(FAST + ["--steps", "20", "--out", str(b), "--resume"])
    assert step_of(b) == (20, 20, 20)
    for name in ("model", "train_state"):
        sa, sb = state(a, name), state(b, name)
        assert sa.keys() == sb.keys()
        for k in sa:
            assert torch.equal(sa[k], sb[k]), f"{name}: {k} differs"
    losses = [checkpoint.read_run(run)["losses"] for run in (a, b)]
    assert losses[0] == losses[1]


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    forward, calls = dreamllm.DreamLLM.forward, []

    def poisoned(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        calls.append(1)
        if len(calls) == 4:  # step 4
            out["diffusion"] = out["diffusion"] * float("nan")
        return out
    monkeypatch.setattr(dreamllm.DreamLLM, "forward", poisoned)
    monkeypatch.setattr(train, "by_length", lambda lengths: [range(len(lengths))])  # a forward a step
    line = fails(FAST + ["--steps", "6", "--save-every", "2", "--out", str(tmp_path)], capsys)
    assert "step 4" in line and "nan" in line and "step 2" in line
    assert step_of(tmp_path) == (2, 2, 2)
    # no temporary file left; the metrics of steps 1 to 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl", "step-2"]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_ctrl_c_or_sigterm_saves_then_exits_130_and_the_run_resumes(signum, tmp_path, monkeypatch, capsys):
    forward, calls = dreamllm.DreamLLM.forward, []

    def interrupting(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # during step 2: that step finishes, is saved, then the run stops
            signal.raise_signal(signum)
        return forward(self, *args, **kwargs)
    monkeypatch.setattr(dreamllm.DreamLLM, "forward", interrupting)
    before = signal.getsignal(signum)  # Python's default, or SIG_IGN in a background job
    line = fails(FAST + ["--steps", "4", "--out", str(tmp_path)], capsys, code=130)
    assert "interrupted" in line and "--resume" in line
    assert step_of(tmp_path) == (2, 2, 2)
    assert signal.getsignal(signum) is before  # the handler was put back
    train.main(FAST + ["--steps", "4", "--out", str(tmp_path), "--resume"])
    assert step_of(tmp_path) == (4, 4, 4)


def test_bad_runs_are_refused_with_one_line(tmp_path, capsys):
    out = str(tmp_path / "run")
    assert "no checkpoint" in fails(FAST + ["--steps", "2", "--out", out, "--resume"], capsys)
    train.main(FAST + ["--steps", "2", "--out", out])
    assert "--resume" in fails(FAST + ["--steps", "2", "--out", out], capsys)  # never overwritten silently
    assert "--stage" in fails(FAST + ["--steps", "2", "--out", out, "--resume", "--stage", "II"], capsys)
    assert "--batch-size" in fails(FAST + ["--steps", "4", "--out", out, "--resume", "--batch-size", "3"], capsys)
    (tmp_path / "run" / "step-2" / "config.json").write_text("{not json")
    assert "not valid JSON" in fails(FAST + ["--steps", "2", "--out", out, "--resume"], capsys)
    (tmp_path / "run" / "step-2" / "config.json").write_text("{}")  # never a silent restart at step 0
    assert "'preset' is missing" in fails(FAST + ["--steps", "2", "--out", out, "--resume"], capsys)
    (tmp_path / "file").write_text("")
    assert "is a file" in fails(FAST + ["--steps", "2", "--out", str(tmp_path / "file")], capsys)


# ---- data and state ---------------------------------------------------------------------------------

def test_batches_are_a_pure_function_of_seed_and_index_and_never_held_out():
    args = train.parse_args(["--stage", "III"])
    source = train.example_source(args, train.STAGES["III"])
    a, b = [source(e) for e in range(12)], [source(e) for e in range(12)]
    assert [x[0::2] for x in a] == [y[0::2] for y in b]  # text, layout; and the images:
    assert all(x.tobytes() == y.tobytes() for ex, ey in zip(a, b) for x, y in zip(ex[1], ey[1]))
    examples = [source(e) for e in range(300)]
    assert all((text + reply).count(data.IMAGE_TOKEN) == len(images) >= 1
               for text, images, _, reply in examples)
    layouts = [layout for _, _, layout, _ in examples]
    # III's official mix: questions, pairs written and read, instructed documents, in its proportions
    weights = train.STAGES["III"]["mix"]  # {kind: weight}, an epoch of sum(weights) examples
    first = [layouts[e] for e in range(sum(weights.values()))]
    kind = dict(vqa="chat", t2i="t2i", i2t="i2t", instruct="instruct")
    assert {kind[k]: w for k, w in weights.items()} == {k: first.count(k) for k in set(first)}
    for text, _, layout, reply in examples:
        if layout == "t2i":
            assert text.endswith(" " + data.IMAGE_TOKEN) and not reply
        elif layout == "chat":
            assert text.startswith(data.IMAGE_TOKEN + " ") and text.endswith("?") and reply.startswith(" ")
    for colour, shape in data.HELD_OUT:
        assert not any(f"{colour} {shape}" in text + reply for text, _, _, reply in examples)


def test_trained_state_round_trips_and_is_strict():
    m, fresh = dreamllm.build("tiny", seed=1), dreamllm.build("tiny", seed=2)
    groups = ["dream_queries", "condition_projector", "visual_projector", "new_tokens"]
    s = m.trained_state(groups)
    assert s["new_tokens.embed_tokens"].shape == (m.llm.cfg.vocab_size - m.n_text_vocab, 64)
    assert set(s) == {"dream_queries", "condition_projector.weight", "visual_projector.weight", "visual_projector.bias",
                      "new_tokens.embed_tokens", "new_tokens.lm_head"}
    old_rows = fresh.llm.model.embed_tokens.weight[:fresh.n_text_vocab].clone()
    fresh.load_trained_state(s)
    assert all(torch.equal(v, fresh.trained_state(groups)[k]) for k, v in s.items())
    assert torch.equal(fresh.llm.model.embed_tokens.weight[:fresh.n_text_vocab], old_rows)
    with pytest.raises(ValueError, match="unknown"):
        fresh.load_trained_state({"dream_querie": s["dream_queries"]})
    with pytest.raises(ValueError, match="dream_queries"):
        fresh.load_trained_state({"dream_queries": torch.zeros(3, 64)})
    assert "llm.model.norm.weight" in m.trained_state(["llm"])


def test_prompts_are_laid_out_as_in_training(monkeypatch):
    m = dreamllm.build("tiny")
    seen = []
    embed = m.embed
    monkeypatch.setattr(m, "embed", lambda ids, *a: seen.append(ids[0].tolist()) or embed(ids, *a))
    m.text_to_image("a red circle", steps=1, progress=False)
    trained = m.encode_document("a red circle <image>", 1, "t2i")[0].tolist()  # a pair, as stage I
    assert seen[0] == trained[:len(seen[0])] and seen[0][-1] == m.token_id["<im_patch>"]
    assert len(seen[0]) == len(trained) - 2  # all but <dream_end> and EOS


@pytest.mark.skipif(not (ROOT / "weights" / "toy" / "unet" / "config.json").is_file(), reason="no toy weights yet")
def test_toy_preset_loads():
    m = dreamllm.build("toy")
    assert m.config.image_size == 64 and m.n_patches == 16
    assert m.tokenizer.token_to_id("<image>") == m.token_id["<image>"] < m.n_text_vocab
    assert m.text_to_image("a red circle", steps=2, progress=False)[0].size == (64, 64)


def test_toy_preset_without_its_folder_says_how_to_make_it(monkeypatch, tmp_path):
    monkeypatch.setitem(dreamllm.PRESETS, "toy", dict(dreamllm.PRESETS["toy"], folder=tmp_path))
    with pytest.raises(FileNotFoundError, match="python -m weights.train_toy"):
        dreamllm.build("toy")


def test_init_starts_from_another_run_and_keeps_what_it_trained(tmp_path):
    first, second = tmp_path / "creation", tmp_path / "comprehension"
    train.main(FAST + ["--steps", "2", "--out", str(first)])
    train.main(FAST + ["--stage", "I-comprehension", "--steps", "2", "--init", str(first), "--out", str(second)])
    a, b = state(first), state(second)
    assert torch.equal(a["dream_queries"], b["dream_queries"])  # not trained here, carried over
    assert "visual_projector.weight" in b and "visual_projector.weight" not in a
    fresh = dreamllm.build("tiny").visual_projector.weight.detach()
    assert not torch.equal(b["visual_projector.weight"], fresh)  # trained


def test_the_curriculum_runs_each_stage_from_the_last_skips_what_is_done_and_resumes(tmp_path,
                                                                                      capsys):
    # python train.py: stages I-creation, I-comprehension, II, III, each its own run folder
    root = tmp_path / "toy"
    flags = ["--preset", "tiny", "--stage", "all", "--device", "cpu", "--batch-size", "2",
             "--log-every", "1"]
    names = [name for name, _ in train.CURRICULA["tiny"]]
    train.main(flags + ["--out", str(root)])
    runs = [checkpoint.read_run(root / name) for name in names]
    assert [r["stage"] for r in runs] == names and all(r["step"] == 2 for r in runs)
    assert [r["args"]["init"] for r in runs] == [None] + [str(root / n) for n in names[:-1]]
    assert runs[-1]["groups"] == ["dream_queries", "condition_projector", "visual_projector", "llm"]
    # II carries I-creation's queries through I-comprehension, which does not train them
    assert torch.equal(state(root / "I-creation")["dream_queries"],
                       state(root / "I-comprehension")["dream_queries"])
    assert not torch.equal(state(root / "I-comprehension")["dream_queries"],
                           state(root / "II")["dream_queries"])
    assert checkpoint.read_final(root) == (root / "III", checkpoint.read_run(root / "III"))
    for name in names:  # every logged step's losses, lr and speed
        lines = (root / name / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(x)["step"] for x in lines] == [1, 2]
    before = {n: checkpoint.read_run(root / n)["path"].stat().st_mtime_ns for n in names}
    capsys.readouterr()
    train.main(flags + ["--out", str(root)])  # all done: each stage skipped, nothing rewritten
    assert capsys.readouterr().out.count("already trained") == 4
    assert before == {n: checkpoint.read_run(root / n)["path"].stat().st_mtime_ns for n in names}
    # an interrupted stage (II at step 1): the curriculum asks for --resume, then goes on
    shutil.rmtree(root / "III")
    shutil.rmtree(root / "II" / "step-2")
    train.main(flags + ["--stage", "II", "--steps", "2", "--init", str(root / "I-comprehension"),
                        "--stop-after", "1", "--out", str(root / "II-part")])
    shutil.copytree(root / "II-part" / "step-1", root / "II" / "step-1")
    assert checkpoint.read_final(root)[0] == root / "II"  # the last stage with a checkpoint
    assert "--resume" in fails(flags + ["--out", str(root)], capsys)
    train.main(flags + ["--out", str(root), "--resume"])
    assert checkpoint.read_run(root / "III")["step"] == 2
    assert "sets one stage" in fails(flags + ["--steps", "5", "--out", str(root)], capsys)
    assert "curriculum's folder" in fails(FAST + ["--steps", "2", "--out", str(root)], capsys)
    assert "not a curriculum" in fails(flags + ["--out", str(root / "III")], capsys)
    assert "no curriculum" in fails(["--preset", "dreamllm-7b", "--stage", "all", "--out",
                                     str(tmp_path / "x")], capsys)


def test_the_anchor_holds_the_condition_to_the_one_the_stage_began_with(tmp_path):
    # stage II from stage I, with and without the anchor: at step 1 the model is its anchor (the
    # term is 0); after, the anchored run's conditions stay nearer the start than the free run's
    first = tmp_path / "creation"
    train.main(FAST + ["--steps", "2", "--out", str(first)])
    flags = FAST + ["--stage", "II", "--steps", "6", "--lr", "3e-3", "--mix", "t2i,document",
                    "--init", str(first)]
    train.main(flags + ["--anchor-weight", "0", "--out", str(tmp_path / "free")])
    train.main(flags + ["--anchor-weight", "100", "--out", str(tmp_path / "anchored")])
    logged = [json.loads(x) for x in (tmp_path / "anchored" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["anchor"] == 0 and logged[-1]["anchor"] > 0
    prompts = [data.example("t2i", 1, e)[0].split(data.IMAGE_TOKEN)[0] for e in range(8)]

    def conditions(folder):
        model = dreamllm.build("tiny")
        model.load_trained_state(state(folder))
        with torch.no_grad():
            return torch.cat([model.condition(p) for p in prompts])
    start = conditions(first)
    moved = {name: (conditions(tmp_path / name) - start).pow(2).mean().item()
             for name in ("free", "anchored")}
    assert 0 < moved["anchored"] < moved["free"] / 4, moved


@pytest.mark.parametrize("objective", ["score", "both", "lm-mean-example"])
def test_a_micro_batch_cut_by_length_gives_the_same_losses(objective, tmp_path, monkeypatch):
    # documents, pairs written and read: cut in two by length, each part weighed by its share of
    # the labels, images and pairs, the losses are the whole batch's (to float rounding)
    lengths = [300, 20, 80, 280, 22, 78]
    parts = train.by_length(lengths)
    assert sorted(k for p in parts for k in p) == list(range(6)) and len(parts) == 2
    assert max(lengths[k] for k in parts[0]) < min(lengths[k] for k in parts[1])
    assert train.by_length([20, 22, 25, 28]) == [range(4)]  # alike: one batch
    flags = FAST + ["--stage", "II", "--steps", "1", "--batch-size", "6",
                    "--mix", "document,t2i,i2t"]
    if objective == "both":  # the alignment too, and its null (at the condition dropout's rate)
        flags += ["--preset", "tiny-text", "--objective", "both", "--bridge", "mapper",
                  "--cond-dropout", "0.1"]
    if objective == "lm-mean-example":  # each example's mean LM loss weighs alike
        flags += ["--lm-mean", "example"]
    cuts, by_length = [], train.by_length
    monkeypatch.setattr(train, "by_length", lambda lengths: cuts.append(by_length(lengths)) or cuts[-1])
    train.main(flags + ["--out", str(tmp_path / "cut")])
    assert [len(c) for c in cuts] == [2]  # this batch was cut
    monkeypatch.setattr(train, "by_length", lambda lengths: [range(len(lengths))])
    train.main(flags + ["--out", str(tmp_path / "whole")])
    cut, whole = ([json.loads(x) for x in (tmp_path / n / "metrics.jsonl").read_text().splitlines()]
                  for n in ("cut", "whole"))
    for key in ("loss", "lm", "diffusion") + (("align",) if objective == "both" else ()):
        assert cut[0][key] == pytest.approx(whole[0][key], rel=1e-5) and whole[0][key] > 0


def test_score_every_k_takes_the_diffusion_loss_on_every_kth_step_weighted_k(tmp_path, monkeypatch):
    # --score-every 2: the UNet's loss on steps 1 and 3 of 4, weighted 2; the alignment on each;
    # a step without the score logs the last diffusion loss taken
    scored, diffusion_loss = [], dreamllm.DreamLLM.diffusion_loss
    monkeypatch.setattr(dreamllm.DreamLLM, "diffusion_loss",
                        lambda self, *a, **k: scored.append(1) or diffusion_loss(self, *a, **k))
    train.main(FAST + ["--preset", "tiny-text", "--objective", "both", "--bridge", "mapper",
                       "--steps", "4", "--score-every", "2", "--out", str(tmp_path)])
    assert len(scored) == 2
    logs = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logs] == [1, 2, 3, 4]
    for r in logs[0::2]:  # scored: weight 2 on the diffusion loss, 1 on the alignment
        assert r["loss"] == pytest.approx(2 * r["diffusion"] + r["align"], rel=1e-5) and r["diffusion"] > 0
    for before, r in zip(logs[0::2], logs[1::2]):  # the alignment alone; the last score shown
        assert r["loss"] == pytest.approx(r["align"], rel=1e-5) and r["diffusion"] == before["diffusion"]


@pytest.mark.parametrize("objective, scored", [("both", 2), ("score", 4)])
def test_a_stages_score_every_holds_only_beside_the_alignment(objective, scored, tmp_path, monkeypatch):
    # a recipe's score_every skips the score on steps the alignment still trains; with the score
    # alone those steps would train nothing, and it is every step
    from plumbing import recipes
    monkeypatch.setitem(recipes.RECIPES, "tiny-text", dict(stages={"I-creation": dict(score_every=2)}))
    calls, diffusion_loss = [], dreamllm.DreamLLM.diffusion_loss
    monkeypatch.setattr(dreamllm.DreamLLM, "diffusion_loss",
                        lambda self, *a, **k: calls.append(1) or diffusion_loss(self, *a, **k))
    bridge = "mapper" if objective == "both" else "projector"
    train.main(FAST + ["--preset", "tiny-text", "--objective", objective, "--bridge", bridge,
                       "--steps", "4", "--out", str(tmp_path)])
    assert len(calls) == scored


def test_a_run_trained_under_another_recipe_is_neither_continued_nor_skipped(tmp_path, capsys, monkeypatch):
    # the code's recipe for the stage changed after the run (a student's pull): a finished stage
    # is not skipped as done, nor a begun one continued, on the new recipe's say-so
    from plumbing import recipes
    flags = FAST + ["--steps", "2", "--out", str(tmp_path)]
    train.main(flags)
    assert checkpoint.read_run(tmp_path)["recipe"]["lr"] == recipes.STAGES["I-creation"]["lr"]
    train.main(flags + ["--resume"])  # the same recipe: done, skipped
    monkeypatch.setitem(recipes.STAGES, "I-creation", recipes.STAGES["I-creation"] | dict(lr=1e-3))
    line = fails(flags + ["--resume"], capsys)
    assert "I-creation's lr 0.002" in line and "now says 0.001" in line and "another --out" in line
    from tools import sweep
    run = argparse.Namespace(folder=tmp_path, steps=2, argv=flags[:-2] + ["--out", str(tmp_path)])
    with pytest.raises(checkpoint.CheckpointError, match="another recipe"):
        sweep.state(run)


def test_trains_on_a_manifest_of_documents(tmp_path):
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in range(3):
            text, scenes = data.document_example(7, i)
            for j, scene in enumerate(scenes):
                data.draw(scene).save(tmp_path / f"{i}_{j}.png")
            f.write(json.dumps(dict(text=text, images=[f"{i}_{j}.png" for j in range(len(scenes))])) + "\n")
    train.main(FAST + ["--steps", "2", "--data", str(tmp_path / "docs.jsonl"), "--out", str(tmp_path / "run")])
    assert step_of(tmp_path / "run") == (2, 2, 2)


# ---- a crash or a full disk inside a save ------------------------------------------------------------

class Crash(BaseException):  # the process dies here (kill -9, power cut): nothing after it runs
    pass


def save_operations(monkeypatch, when):
    # Counts the file operations of checkpoint.save_run; when(n, name) may raise at the n-th. A
    # save_file that crashes leaves half its file behind, as a real one would.
    count = [0]

    def wrap(module, name):
        real = getattr(module, name)

        def op(*args, **kwargs):
            count[0] += 1
            if name == "save_file":
                real(*args, **kwargs)
                path = Path(args[1])
                half = path.read_bytes()[:path.stat().st_size // 2]
                when(count[0], name, lambda: path.write_bytes(half))
                return None
            when(count[0], name, lambda: None)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, op)
    for module, name in ((checkpoint, "save_file"), (checkpoint, "_write_json"), (checkpoint, "_fsync"),
                         (checkpoint.os, "rename"), (checkpoint.shutil, "rmtree"), (checkpoint.Path, "mkdir")):
        wrap(module, name)
    return count


def test_a_crash_or_full_disk_at_any_point_of_a_save_resumes_bit_identically(tmp_path, monkeypatch, capsys):
    steps = FAST + ["--steps", "3", "--save-every", "1"]
    train.main(steps + ["--out", str(tmp_path / "whole")])
    want = {name: state(tmp_path / "whole", name) for name in ("model", "train_state")}
    with monkeypatch.context() as m:  # how many file operations one save takes
        count = save_operations(m, lambda n, name, half: None)
        train.main(steps[:-4] + ["--steps", "1", "--out", str(tmp_path / "probe")])
        per_save = count[0]
    assert per_save >= 8
    results = []
    for point in range(1, per_save + 1):
        for fault in ("crash", "disk full"):
            out = tmp_path / f"{fault}-{point}"
            with monkeypatch.context() as m:
                def when(n, name, half, point=point, fault=fault):
                    if n == per_save + point:  # inside the second save (step 2)
                        half()
                        if fault == "crash":
                            raise Crash(f"{name} #{n}")
                        raise OSError(28, "No space left on device")
                save_operations(m, when)
                if fault == "crash":
                    with pytest.raises(Crash):
                        train.main(steps + ["--out", str(out)])
                else:
                    line = fails(steps + ["--out", str(out)], capsys)
                    assert "could not be written" in line and "No space left" in line
            first = checkpoint.read_run(out)
            assert first is not None and first["step"] in (1, 2), (point, fault)  # a whole one is left
            train.main(steps + ["--out", str(out), "--resume"])
            got = {name: state(out, name) for name in ("model", "train_state")}
            same = all(torch.equal(got[f][k], want[f][k]) for f in want for k in want[f])
            results.append((point, fault, first["step"], same))
            assert sorted(p.name for p in out.iterdir()) == ["metrics.jsonl", "step-3"], (point, fault)
    assert all(same for *_, same in results), results
    print(f"\n{len(results)} faults injected ({per_save} file operations per save x crash/disk full): "
          "every run resumed bit-identically")


def test_the_anchor_holds_a_documents_opening_to_its_bare_captions_condition(tmp_path):
    # stage II on openings ("Here is X. <image>"): the anchor's target for one is the stage start's
    # condition of its bare caption, "X <image>" (data.unframe), so at step 1 the term is not 0, and
    # training moves the opening's condition toward that of its caption
    first = tmp_path / "creation"
    train.main(FAST + ["--steps", "2", "--out", str(first)])
    train.main(FAST + ["--stage", "II", "--steps", "12", "--lr", "1e-4", "--mix", "opening",
                       "--anchor-weight", "1", "--diffusion-weight", "1e-6",  # the anchor alone
                       "--init", str(first), "--out", str(tmp_path / "II")])
    logged = [json.loads(x) for x in (tmp_path / "II" / "metrics.jsonl").read_text().splitlines()]
    assert logged[0]["anchor"] > 0
    openings = [data.example("opening", 0, e)[0] for e in range(8)]

    def conditions(folder, texts):
        model = dreamllm.build("tiny")
        model.load_trained_state(state(folder))
        with torch.no_grad():
            return torch.cat([model.condition(t.split(data.IMAGE_TOKEN)[0].strip()) for t in texts])
    bare = conditions(first, [data.unframe(t) for t in openings])  # what the anchor holds them to
    before, after = conditions(first, openings), conditions(tmp_path / "II", openings)
    assert (after - bare).pow(2).mean() < 0.5 * (before - bare).pow(2).mean()


def test_the_alignment_regresses_an_opening_onto_its_bare_captions_text_states(tmp_path, monkeypatch):
    # GILL's alignment on openings ("Here is X. <image>") takes E("X"), what the toy SD was trained
    # on, not E("Here is X."); a bare pair's caption as it is
    asked = []
    text_states = dreamllm.DreamLLM.text_states
    monkeypatch.setattr(dreamllm.DreamLLM, "text_states",
                        lambda self, captions: asked.append(list(captions)) or text_states(self, captions))
    train.main(FAST + ["--preset", "tiny-text", "--objective", "align", "--bridge", "mapper",
                       "--stage", "II", "--steps", "2", "--mix", "opening,t2i",
                       "--out", str(tmp_path / "II")])
    texts = [data.example(kind, 0, e)[0] for e, kind in enumerate(["opening", "t2i"] * 2)]
    want = [data.unframe(t).split(data.IMAGE_TOKEN)[0].strip() for t in texts]
    assert want[0] != texts[0].split(data.IMAGE_TOKEN)[0].strip()  # an opening, unframed
    assert [c for batch in asked for c in batch if c] == want
