"""Reading official checkpoint folders: the one piece of loading the three backbones share.

A Hugging Face / diffusers folder holds `config.json` beside the weights, which come as one file
(`model.safetensors`), as shards named by an index (`model.safetensors.index.json`), or as the old
pickled `pytorch_model.bin`. We read safetensors tensor by tensor and `.bin` files with
`weights_only=True` (never unpickling arbitrary objects), then assign the tensors into a model
built on the meta device, so a 7B model never exists twice in memory.

Every failure is a CheckpointError whose message is one line naming the file and the problem.
"""
import json
import re
from pathlib import Path

import torch
from safetensors import safe_open


class CheckpointError(Exception):
    pass


def read_config(folder, name="config.json"):
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such folder (expected a model folder with {name} beside the weights)")
    path = folder / name
    if not path.is_file():
        raise CheckpointError(f"{path}: missing (a model folder holds {name} beside the weights)")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None


def weight_files(folder, names):
    """The files of the first of `names` found in `folder`: the file itself, or the shards its index names."""
    folder = Path(folder)
    for name in names:
        if (folder / name).is_file():
            return [folder / name]
        index = folder / (name + ".index.json")
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as e:
                raise CheckpointError(f"{index}: not a shard index (no valid weight_map: {e})") from None
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise CheckpointError(f"{index}: names shards that are missing: {', '.join(missing)}")
            return [folder / s for s in shards]
    raise CheckpointError(f"{folder}: no weights found (looked for {', '.join(names)}, single or sharded)")


def read_state_dict(files, dtype=None, device="cpu", keep=lambda key: True):
    """The tensors of the files whose keys `keep` accepts, in one dict, cast to `dtype` (floating
    tensors only) on `device`."""
    state = {}
    for path in map(Path, files):
        try:
            if path.suffix == ".safetensors":
                with safe_open(str(path), framework="pt", device=str(device)) as f:
                    part = {k: f.get_tensor(k) for k in f.keys() if keep(k)}  # one tensor at a time
            else:
                part = torch.load(path, map_location=device, weights_only=True, mmap=True)
        except Exception as e:  # safetensors and torch.load raise many kinds on a damaged file
            reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
            raise CheckpointError(f"{path}: cannot be read ({reason}); is it truncated? download it again") from None
        if not isinstance(part, dict) or not all(isinstance(v, torch.Tensor) for v in part.values()):
            raise CheckpointError(f"{path}: does not hold a flat dict of tensors")
        for k, v in part.items():
            if keep(k):
                state[k] = v.to(dtype) if dtype is not None and v.is_floating_point() else v
    return state


def assign(model, state, source, ignore=()):
    """Load `state` into `model` (built on the meta device) strictly, by assignment, not copy.

    Keys matching a regex in `ignore` are dropped first (e.g. the non-persistent buffers such as
    `rotary_emb.inv_freq` that old checkpoints carry). Anything else missing, unexpected or of the
    wrong shape fails with one line listing it.
    """
    state = {k: v for k, v in state.items() if not any(re.search(p, k) for p in ignore)}
    expected = model.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    wrong = [f"{k} {list(state[k].shape)} != {list(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    problems = [f"{len(keys)} {what}: {', '.join(keys[:6])}{', ...' if len(keys) > 6 else ''}"
                for what, keys in (("missing keys", missing), ("unexpected keys", unexpected),
                                   ("wrong shapes (checkpoint != model)", wrong)) if keys]
    if problems:
        raise CheckpointError(f"{source}: does not match the model's config; " + "; ".join(problems))
    model.load_state_dict(state, strict=True, assign=True)
    return model
