"""Checkpoint folders: reading the official ones (the one piece of loading the three backbones
share), and writing and reading our training runs' (below; Checkpointer: train.py's saving).

A Hugging Face / diffusers folder holds `config.json` beside the weights, which come as one file
(`model.safetensors`), as shards named by an index (`model.safetensors.index.json`), or as the old
pickled `pytorch_model.bin`. We read safetensors tensor by tensor and `.bin` files with
`weights_only=True` (never unpickling arbitrary objects), then assign the tensors into a model
built on the meta device, so a 7B model never exists twice in memory.

Every failure is a CheckpointError whose message is one line naming the file and the problem.
"""
import dataclasses
import json
import os
import types
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file


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
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise CheckpointError(f"{path}: expected a JSON object of settings, got a {type(config).__name__}")
    return config


def check_types(config):
    # A config dataclass, maybe built from a config.json: each field of the type it declares, so that
    # "num_hidden_layers": "two" is named here, not deep inside a model's build. A float field takes
    # an int; a tuple field a list, of numbers.
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        kinds = f.type.__args__ if isinstance(f.type, types.UnionType) else (f.type,)
        if not any(_is(value, kind) for kind in kinds):
            names = " or ".join(getattr(k, "__name__", str(k)).replace("NoneType", "null") for k in kinds)
            raise ValueError(f"{type(config).__name__}.{f.name} = {value!r}: expected {names}")


def _is(value, kind):
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is tuple:
        return isinstance(value, (tuple, list)) and all(isinstance(v, (int, float)) for v in value)
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, kind)


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


# ----------------------------------------------------------------------------------------------------
# A training run's folder (train.py --out). Each checkpoint is a folder of its own, step-<N>/:
#     model.safetensors        what the run trained, by name (DreamLLM.trained_state): what sampling needs
#     train_state.safetensors  AdamW's moments and step counts (and the whitening's), for --resume
#     config.json              preset, stage, groups, DreamConfig, step, steps, seed, the arguments
# written whole into step-<N>.tmp/ and then renamed: one rename is the moment a checkpoint exists,
# so a crash or a full disk at any point leaves the last whole checkpoint (the newest step-<N>/)
# and at most some debris, which the next save clears. Older checkpoints go only after a newer one
# is whole.

RUN_FILES = ("model.safetensors", "train_state.safetensors", "config.json")


def _steps(folder):  # {N: path} of the whole checkpoints in a run's folder
    found = {}
    for p in Path(folder).glob("step-*"):
        if p.is_dir() and p.name[5:].isdigit() and all((p / f).is_file() for f in RUN_FILES):
            found[int(p.name[5:])] = p
    return found


def latest(folder):  # the newest whole checkpoint's folder, or None
    steps = _steps(folder)
    return steps[max(steps)] if steps else None


RUN_KEYS = dict(preset=str, stage=str, groups=list, step=int, steps=int, seed=int, dream_config=dict,
                args=dict)


def read_run(folder):
    # the newest checkpoint's config.json (with "path": its folder added), or None if there is none
    path = latest(folder)
    if path is None:
        if (Path(folder) / "model.safetensors").is_file():
            raise CheckpointError(f"{folder}: a run folder of an older train.py (its files at the "
                                  "top, not in step-N/); train again into a new --out")
        return None
    config = read_config(path)
    if not isinstance(config, dict):
        raise CheckpointError(f"{path / 'config.json'}: expected a JSON object")
    for key, kind in RUN_KEYS.items():
        if not isinstance(config.get(key), kind):
            raise CheckpointError(f"{path / 'config.json'}: key {key!r} is missing or not of "
                                  f"type {kind.__name__}")
    return dict(config, path=path)


def read_final(folder):
    # A curriculum's folder (train.py --stage all: curriculum.json and a run folder per stage) ->
    # (the folder of its last stage that holds a checkpoint, read_run of it); a run's folder ->
    # (itself, read_run of it); (folder, None) when it holds neither
    listing = Path(folder) / "curriculum.json"
    if latest(folder) is None and listing.is_file():
        stages = read_config(folder, "curriculum.json").get("stages", [])
        for name in reversed(stages if isinstance(stages, list) else []):
            if (run := read_run(Path(folder) / str(name))) is not None:
                return Path(folder) / str(name), run
    return Path(folder), read_run(folder)


def read_tensors(run, name):  # "model" or "train_state" of the checkpoint read_run() found
    path = run["path"] / f"{name}.safetensors"
    try:
        return load_file(path)
    except (OSError, SafetensorError) as e:
        raise CheckpointError(f"{path}: unreadable ({e})") from None


def save_run(folder, step, tensors, config):
    # {"model": {...}, "train_state": {...}} and config -> folder/step-<step>/, whole or not at all
    folder = Path(folder)
    final, tmp = folder / f"step-{step}", folder / f"step-{step}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)  # debris of a save that crashed
    tmp.mkdir(parents=True)
    for name, t in tensors.items():
        save_file(t, str(tmp / f"{name}.safetensors"), {"step": str(step)})
    _write_json(tmp / "config.json", config)
    for f in RUN_FILES:
        _fsync(tmp / f)
    shutil.rmtree(final, ignore_errors=True)  # a checkpoint of this step that an earlier run left
    os.rename(tmp, final)  # the checkpoint exists from here on
    _fsync(folder)
    for step_, path in _steps(folder).items():  # the older ones, and any debris
        if step_ != step:
            shutil.rmtree(path, ignore_errors=True)
    for debris in folder.glob("step-*.tmp"):
        shutil.rmtree(debris, ignore_errors=True)


def _write_json(path, obj):
    path.write_text(json.dumps(obj, indent=2) + "\n")


def _fsync(path):  # to the disk, so that a power cut after the rename finds the files whole
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def optimizer_tensors(optimizer):
    # AdamW's state {i: {key: tensor}} -> flat {"i.key": CPU tensor}, FSDP's shards gathered
    def whole(v):
        return (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().cpu().contiguous()
    return {f"{i}.{k}": whole(v) for i, s in optimizer.state_dict()["state"].items() for k, v in s.items()}


def load_optimizer_tensors(optimizer, tensors, device):
    # the inverse of optimizer_tensors, into an optimizer over the same parameters in the same order
    state, flat = {}, [p for g in optimizer.param_groups for p in g["params"]]
    for key, t in tensors.items():
        i, name = key.split(".", 1)
        p = flat[int(i)]
        if hasattr(p, "device_mesh") and t.shape == p.shape:  # FSDP: this process's shard of it
            from torch.distributed.tensor import distribute_tensor
            t = distribute_tensor(t.to(device), p.device_mesh, p.placements)
        state.setdefault(int(i), {})[name] = t
    groups = optimizer.state_dict()["param_groups"]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


class Checkpointer:
    # train.py's saving of its run (save_run): every process gathers (FSDP's shards), process 0
    # writes.
    # Before the first step it checks that the folder is writable and has room for two checkpoints
    # (the new one is written beside the last), so a problem shows before the training, not after.
    def __init__(self, args, out, model, groups, opt, whitening, units, rank, run):
        self.args, self.out, self.model, self.groups, self.opt = args, out, model, groups, opt
        self.whitening, self.units, self.rank = whitening, units, rank
        self.saved, self.losses = (run["step"] if run else None), (run or {}).get("losses", {})
        if rank == 0:
            self.check_writable()

    def check_writable(self):
        try:
            self.out.mkdir(parents=True, exist_ok=True)
            probe = self.out / ".write-test"
            probe.write_bytes(b"0")
            probe.unlink()
        except OSError as e:
            raise CheckpointError(f"--out {self.out}: cannot write there ({e.strerror or e}); "
                                  "pick another --out") from None
        tensors = self.model.trained_state(self.groups).values()
        trained = sum(t.numel() * t.element_size() for t in tensors)
        need = 2 * 3 * trained  # the model and AdamW's two moments, twice (the new beside the last)
        free = shutil.disk_usage(self.out).free
        if free < need:
            raise CheckpointError(f"--out {self.out}: {free / 2**20:.0f} MiB free, a checkpoint "
                                  f"needs {need / 2**20:.0f} MiB; free some space or pick another --out")

    def save(self, step):
        for u in self.units:
            u.unshard()  # full parameters in place of the shards, for trained_state
        trained = self.model.trained_state(self.groups)
        for u in self.units:
            u.reshard()
        train_state = optimizer_tensors(self.opt)
        train_state |= self.whitening.state() if self.whitening else {}
        if self.rank == 0:
            a = self.args
            config = dict(preset=a.preset, stage=a.stage, groups=self.groups, step=step,
                          steps=a.steps, seed=a.seed, dream_config=dataclasses.asdict(self.model.config),
                          losses=self.losses, args=a.given, recipe=a.recipe)
            tensors = dict(model=trained, train_state=train_state)
            try:
                save_run(self.out, step, tensors, config)
            except OSError as e:
                raise CheckpointError(f"step {step}: the checkpoint could not be written "
                                      f"({e.strerror or e}); {self.kept()}") from None
        self.saved = step

    def kept(self):
        if self.saved is None:
            return "no checkpoint was written"
        return f"the last good checkpoint, step {self.saved}, is kept in {self.out}"
