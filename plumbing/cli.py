"""What the scripts share: one-line errors, Ctrl-C and SIGTERM, the argument parser, the device and
its precision, and building a model by preset name. Not part of the method: train.py, sample.py,
tools/bench.py and weights/train_toy.py import it so that none of them imports another script.
"""
import argparse
import signal
import sys
from contextlib import contextmanager, nullcontext

import torch
from tqdm import tqdm

import dreamllm
from plumbing.checkpoint import CheckpointError
from weights import official

PRESETS = [*dreamllm.PRESETS, *official.PRESETS]  # ours (tiny, toy), then the release's


class Stop(Exception):  # a one-line error for the user, no traceback; exit status 1
    code = 1


class Interrupted(Stop):  # the user (Ctrl-C) or the system (SIGTERM) stopped the run: status 130
    code = 130


class StopSignals:
    # Ctrl-C (SIGINT) or SIGTERM (a scheduler, `docker stop`): finish the step, save, exit. A second
    # Ctrl-C stops at once, keeping the last checkpoint, unless it falls inside a save.
    def __enter__(self):
        self.received, self.in_save = False, False
        self.previous = {s: signal.signal(s, self.handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def handle(self, signum, frame):
        if self.received and signum == signal.SIGINT and not self.in_save:
            raise KeyboardInterrupt
        self.received = True
        name = signal.Signals(signum).name
        tqdm.write(f"{name}: saving after this step (Ctrl-C again to quit without saving)")

    @contextmanager
    def saving(self):  # the files of a checkpoint are written whole: a second Ctrl-C waits for them
        self.in_save = True
        try:
            yield
        finally:
            self.in_save = False

    def __exit__(self, kind, error, tb):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
        if kind is KeyboardInterrupt:
            raise Interrupted("interrupted; the last checkpoint is kept") from None


class Parser(argparse.ArgumentParser):
    def error(self, message):  # one line (see -h for the usage), exit status 2 as argparse's
        self.exit(2, f"{self.prog}: error: {message} (see -h)\n")


class Help(argparse.ArgumentDefaultsHelpFormatter):  # "(default: ...)" where there is one to show
    def _get_help_string(self, action):
        plain = action.default in (None, False) or "default" in (action.help or "")
        return action.help if plain else super()._get_help_string(action)


def main(run, prog):
    # run() with every expected failure as one line on stderr, and an exit status that says which
    try:
        run()
    except (Stop, CheckpointError, ValueError, OSError) as e:  # OSError: a file, a folder, the disk
        print(f"{prog}: {e}", file=sys.stderr)
        sys.exit(getattr(e, "code", 1))
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        sys.exit(130)


def pick_device(name="auto"):
    # cuda, then mps, then cpu; or the one asked for, if this machine has it
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise Stop(f"--device {name}: not a device (give auto, cpu, cuda, cuda:1 or mps)") from None
    available = {"cpu": True, "cuda": torch.cuda.is_available(),
                 "mps": torch.backends.mps.is_available()}
    if not available.get(device.type, False):
        raise Stop(f"--device {name}: this machine has no {device.type} (try --device auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise Stop(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def autocast(device):  # bf16 on CUDA; fp32 elsewhere
    return torch.autocast("cuda", torch.bfloat16) if device.type == "cuda" else nullcontext()


def cast_frozen(model, dtype):
    # On the GPU the frozen weights (CLIP, the VAE, the UNet, a frozen LLM's blocks) are bf16:
    # half the memory and the bandwidth. What trains is fp32 (AdamW's small updates vanish in bf16),
    # also when it was loaded in bf16, as the official release is.
    for p in model.parameters():
        p.data = p.data.to(torch.float32 if p.requires_grad else dtype)


def build_model(preset, seed=0, **config):
    # a preset of ours (random init from `seed` where it has no weights), or the released model
    if preset in official.PRESETS:
        return official.load_official(official.PRESETS[preset], **config)
    return dreamllm.build(preset, seed, **config)
