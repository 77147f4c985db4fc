"""plumbing/memo.py: the frozen encoders' outputs computed once per input, as train.py uses them."""
import pytest
import torch

from plumbing import memo
from shapes import data
import dreamllm

pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


class Encoder(torch.nn.Module):  # a frozen encoder that counts the rows it is asked for, by batch
    def __init__(self, seed=0, pair=False):
        super().__init__()
        self.proj, self.pair, self.batches = torch.nn.Linear(4, 3), pair, []
        torch.nn.init.normal_(self.proj.weight, generator=torch.Generator().manual_seed(seed))
        torch.nn.init.zeros_(self.proj.bias)

    def encode(self, x, scale=1.0):
        self.batches.append(len(x))
        y = self.proj(x) * scale
        return (y, -y) if self.pair else y


@pytest.fixture(autouse=True)
def empty_stores(monkeypatch):  # each test starts with no rows remembered
    monkeypatch.setattr(memo, "STORES", {})


def test_a_memo_returns_what_the_encoder_does_and_computes_each_row_once():
    enc = Encoder(pair=True)
    m = memo.Memo(enc.encode, enc)
    a, b = torch.randn(2, 4), torch.randn(2, 4)
    x = torch.stack([a[0], a[1], a[0], b[0]])  # a repeat inside the batch
    for got, want in zip(m(x), enc.encode(x)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert enc.batches == [3, 4] and (m.seen, m.computed) == (4, 3)
    y = torch.stack([b[0], a[1], b[1]])  # two rows seen, one new
    for got, want in zip(m(y), enc.encode(y)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert enc.batches[2] == 2, "a lone new row is encoded beside a copy of itself, never alone"
    assert (m.seen, m.computed) == (7, 4)
    m(y[:2])
    assert len(enc.batches) == 4 and m.computed == 4, "all seen: the encoder is not called"
    torch.testing.assert_close(m(a, 2.0), enc.encode(a, 2.0))  # other arguments, other rows
    assert m.computed == 6


def test_stages_share_rows_with_the_same_weights_only():
    first, same, other = Encoder(seed=0), Encoder(seed=0), Encoder(seed=1)
    x = torch.randn(5, 4)
    memo.Memo(first.encode, first)(x)
    m = memo.Memo(same.encode, same)
    torch.testing.assert_close(m(x), same.encode(x), rtol=0, atol=0)
    assert m.computed == 0, "a later stage's model, the same backbone: nothing to compute"
    n = memo.Memo(other.encode, other)
    torch.testing.assert_close(n(x), other.encode(x), rtol=0, atol=0)
    assert n.computed == 5, "other weights: their own rows"


def test_a_memo_keeps_at_most_its_limit():
    enc = Encoder()
    m = memo.Memo(enc.encode, enc, limit=4)
    x = torch.randn(6, 4)
    m(x[:3])
    torch.testing.assert_close(m(x[1:]), enc.encode(x[1:]), rtol=0, atol=0)  # 3 more: over the limit
    assert len(m.rows) == 3 and m.computed == 6
    m(x[3:])
    assert m.computed == 9, "rows over the limit are computed each time"


def test_the_toy_models_encoders_give_each_picture_the_same_rows_in_any_batch():
    # what keeps a resumed run (an empty memo) bit-identical to the uninterrupted one: a picture's
    # latents and features do not depend on the batch it first came in
    model = dreamllm.build("toy")
    examples = [data.example("t2i", 0, e) for e in range(6)] + [data.example("i2t", 0, e) for e in range(6)]
    batch = model.collate(examples)
    captions = [text.split(data.IMAGE_TOKEN)[0] for text, *_ in examples[:6]]  # the pairs written
    with torch.no_grad():
        plain = model.vae.encode(batch["vae_pixels"]), model.clip.image_features(batch["clip_pixels"], -2)
        plain_states = model.text_states(captions)
        memos = memo.remember(model)
        for k in (4, 1, 5):  # first one picture (encoded beside a copy of itself), then the rest
            model.vae.encode(batch["vae_pixels"][k:k + 1])
            model.clip.image_features(batch["clip_pixels"][k:k + 1], -2)
        remembered = model.vae.encode(batch["vae_pixels"]), model.clip.image_features(batch["clip_pixels"], -2)
        model.text_states(captions[:1])
        states = model.text_states(captions)
    for got, want in zip(remembered[0], plain[0]):
        assert torch.equal(got, want)
    assert torch.equal(remembered[1], plain[1])
    assert torch.equal(states, plain_states)
    assert (memos["vae"].computed, memos["clip"].computed, memos["text"].computed) == (6, 6, 6)
