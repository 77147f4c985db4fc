# Exercise: CLIP's patch embedding (clip.py: VisionTransformer.forward)
import pytest
import torch

import clip
from grading import close, expect


@pytest.fixture
def tower():
    torch.manual_seed(0)  # the tiny tower: 32 px images, 8 px patches: 4 x 4 = 16 patches, width 64
    return clip.VisionTransformer(clip.PRESETS["clip-tiny-vision"].vision)


def images(n=2, seed=1):
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def embeddings(tower, x):
    # patches as vectors (channel, row, column in the patch), times the conv's weight as a matrix
    B, p, D = len(x), 8, tower.embeddings.patch_embedding.weight.shape[0]
    G = 32 // p
    patches = x.reshape(B, 3, G, p, G, p).permute(0, 2, 4, 1, 3, 5).reshape(B, G * G, 3 * p * p)
    tokens = patches @ tower.embeddings.patch_embedding.weight.reshape(D, -1).T  # (B, N, D)
    cls = tower.embeddings.class_embedding.expand(B, 1, D)
    tokens = torch.cat([cls, tokens], 1) + tower.embeddings.position_embedding.weight
    return tower.pre_layrnorm(tokens)  # (B, 1 + N, D)


def test_embeddings_before_any_layer(tower):
    x = images()
    with torch.no_grad():
        got = tower(x, 0)
        want = embeddings(tower, x)
    close(got, want, "forward(pixels, 0): pre_layrnorm([CLS, patches W] + positions), "
          "(B, 1 + 16, 64)")


def test_patches_are_read_row_by_row(tower):
    # change only the patch in grid row 1, column 2: only token 1 + 1*4 + 2 = 7 may change
    x = images()
    y = x.clone()
    y[:, :, 8:16, 16:24] += 1.0
    with torch.no_grad():
        changed = (tower(y, 0) - tower(x, 0)).abs().amax(dim=(0, 2)) > 1e-6
    expect(changed.nonzero().flatten().tolist() == [7],
           f"changing the patch at row 1, column 2 changed tokens "
           f"{changed.nonzero().flatten().tolist()}, expected [7] (CLS first, then row-major)")


def test_then_the_first_layers(tower):
    x = images(seed=2)
    with torch.no_grad():
        got = tower(x, 2)
        want = embeddings(tower, x)
        for layer in tower.encoder.layers[:2]:
            want = layer(want)
    close(got, want, "forward(pixels, 2): the embeddings through encoder.layers[0] and [1]",
          atol=1e-4)
