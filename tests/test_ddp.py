"""Speed and scale, on the CPU: torchrun with 2 processes (gloo) gives the losses and weights of one
process on the same global batch, plain data parallel and FSDP; the static KV cache gives what the
dynamic one gives, and compiled it traces a decode step once for every token; activation checkpointing gives the same loss and gradients."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import dreamllm
import llama
from plumbing import checkpoint

ROOT = Path(__file__).resolve().parent.parent
ENV = dict(os.environ, OMP_NUM_THREADS="1")
torchrun_ok = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                 reason="torch without gloo")


def train(out, *extra, procs=1):
    launcher = [sys.executable] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs)]
    args = ["train.py", "--preset", "tiny", "--stage", "I-creation", "--device", "cpu", "--steps", "3", "--batch-size", "4",
            "--log-every", "1", "--out", str(out), *extra]
    r = subprocess.run(launcher + args, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-1500:] + r.stderr[-3000:]
    run = checkpoint.read_run(out)
    return r.stdout, run["losses"], checkpoint.read_tensors(run, "model")


@torchrun_ok
@pytest.mark.parametrize("extra", [[], ["--stage", "II", "--lr", "1e-3", "--fsdp"]], ids=["data-parallel", "fsdp"])
def test_two_processes_equal_one(tmp_path, extra):
    one_out, one, w1 = train(tmp_path / "one", *[a for a in extra if a != "--fsdp"])
    two_out, two, w2 = train(tmp_path / "two", *extra, procs=2)
    assert "x 2 processes" in two_out and two_out.count("done: 3 steps") == 1  # process 0 alone speaks
    for k in one:  # the step-3 losses: the processes' shares sum to the global batch's
        assert two[k] == pytest.approx(one[k], rel=1e-5, abs=1e-7), (k, one, two)
    assert w1.keys() == w2.keys()
    for k in w1:  # three AdamW steps later, the same weights (to the gradients' summation-order rounding)
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), (k, (w1[k] - w2[k]).abs().max())
    assert not torch.equal(w1["dream_queries"], dreamllm.build("tiny").dream_queries.detach())  # it trained


def test_per_image_generators_make_an_images_draws_independent_of_its_batch():
    model = dreamllm.build("tiny", cond_dropout=0.3)
    docs = [(f"a {c} circle <image>", [Image.new("RGB", (64, 64), c)]) for c in ["red", "blue", "green"]]

    def loss(docs, seeds):
        batch = model.collate(docs)
        batch["draws"] = model.draw_noise([torch.Generator().manual_seed(s) for s in seeds])
        return model(**batch)["diffusion"]
    with torch.no_grad():
        whole = loss(docs, [100, 101, 102])
        parts = [loss(docs[:1], [100]), loss(docs[1:], [101, 102])]
        other = loss(docs, [7, 8, 9])
    assert torch.allclose(whole, (parts[0] + 2 * parts[1]) / 3, rtol=1e-5)  # the mean over images
    assert not torch.allclose(whole, other)  # and the draws do come from those generators


def test_static_cache_equals_the_dynamic_cache():
    torch.manual_seed(0)
    model = llama.build("tiny").eval()
    for p in model.parameters():  # larger weights: a wrong mask or slot shows in the tokens
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = mask[1, :1] = 0  # left padding
    dynamic = model.generate(ids, 24, attention_mask=mask)
    static = model.generate(ids, 24, attention_mask=mask, static_cache=True)
    assert torch.equal(dynamic, static) and len(set(dynamic[2].tolist())) > 3
    cache = model.new_cache(max_len=40, batch_size=3)  # one cache reused, larger than needed
    for rows in ([0, 1, 2], [2, 0, 1]):
        again = model.generate(ids[rows], 24, attention_mask=mask[rows], cache=cache)
        assert torch.equal(again, dynamic[rows])
    with pytest.raises(ValueError, match="do not fit"):
        model.generate(ids, 32, cache=cache)
    with torch.no_grad():  # and logits step by step, a prompt then single tokens, against no cache at all
        full = model(ids)
        cache = model.new_cache(max_len=12, batch_size=3)
        steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, t:t + 1], cache=cache) for t in range(5, 9)]
        assert len(cache) == 9 and cache.k[0].shape == (3, 2, 12, 16)
        assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
        model(ids[:, :3], cache=cache)
        with pytest.raises(ValueError, match="static KV cache full"):
            model(ids[:, :1], cache=cache)


def test_compiled_static_decoding_traces_once_and_gives_the_same_tokens():
    # What a CUDA graph needs, checked on the CPU: with a static cache every decode step has the same
    # shapes and Python values, so after the prefill graph and one decode graph nothing recompiles.
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    model = llama.build("tiny").eval()
    for p in model.parameters():
        torch.nn.init.normal_(p, std=0.2)
    ids = torch.randint(0, 256, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[0, :4] = 0
    eager = model.generate(ids, 12, attention_mask=mask)
    torch._dynamo.reset()
    counters.clear()
    # dynamic=False: no symbolic shapes (a CUDA graph is recorded per shape); aot_eager: no C++ build
    model.compile(backend="aot_eager", fullgraph=True, dynamic=False)
    try:
        first = model.generate(ids, 12, attention_mask=mask, static_cache=True)
        with torch._dynamo.config.patch(error_on_recompile=True):  # a recompile would raise
            second = model.generate(ids.flip(0), 12, attention_mask=mask.flip(0), static_cache=True)
            cache = model.new_cache(21, batch_size=3)
            third = [model.generate(ids, 12, attention_mask=mask, cache=cache) for _ in range(2)]
        assert counters["stats"]["unique_graphs"] == 2  # the prefill (T = 9) and the decode step (T = 1)
    finally:
        torch._dynamo.reset()
    assert torch.equal(first, eager) and torch.equal(second, eager.flip(0))
    assert all(torch.equal(t, eager) for t in third)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = dreamllm.build("tiny", cond_dropout=0.5)
    model.llm.requires_grad_(True)
    batch = model.collate([("a red circle <image>", [Image.new("RGB", (64, 64), "red")]), ("just text", [])])
    batch["draws"] = model.draw_noise([torch.Generator().manual_seed(3)])
    results = []
    for on in (False, True):
        model.llm.gradient_checkpointing = on
        model.zero_grad(set_to_none=True)
        out = model(**batch)
        loss = out["lm"] + 10 * out["diffusion"]
        loss.backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters()
                                               if p.grad is not None}))
    (l0, g0), (l1, g1) = results
    assert torch.equal(l0, l1) and g0.keys() == g1.keys() and len(g0) > 20
    for k in g0:
        assert torch.allclose(g0[k], g1[k], rtol=1e-5, atol=1e-7), k


def test_checkpointing_really_recomputes(monkeypatch):
    # the blocks' forward runs again during backward when checkpointing is on, and only then
    model = llama.build("tiny")
    calls = []
    forward = llama.Block.forward
    monkeypatch.setattr(llama.Block, "forward", lambda self, *a: calls.append(1) or forward(self, *a))
    ids = torch.randint(0, 256, (2, 7))
    for on, expected in ((False, 2), (True, 4)):
        calls.clear()
        model.gradient_checkpointing = on
        model(ids).sum().backward()
        assert len(calls) == expected
