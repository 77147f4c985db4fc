"""Bad input, tried as a hostile user would: every case is a one-line error naming the problem, a
non-zero exit status that means what it says (2: the command line, 1: the input or the machine,
130: an interruption), and nothing lost. The crash-inside-a-save cases are in test_train.py."""
import json
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import clip
import dreamllm
import llama
import sample
import train
import unet
from plumbing import checkpoint
from shapes import data

ROOT = Path(__file__).resolve().parent.parent
TOY = ROOT / "weights" / "toy"
FAST = ["--preset", "tiny", "--stage", "I-creation", "--device", "cpu", "--batch-size", "2", "--steps", "2"]
pytestmark = pytest.mark.usefixtures("one_thread")  # see conftest.py


def one_line(main, argv, capsys, code=1):
    # main(argv) exits with `code` and one line on stderr, no traceback; -> that line
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == code and len(err) == 1 and "Traceback" not in err[0], (e.value.code, err)
    return err[0]


# ---- flags: range-checked when parsed, before anything runs ----------------------------------------

@pytest.mark.parametrize("flags,says", [
    (["--lr", "1e39"], "--lr"), (["--lr", "nan"], "--lr"), (["--lr", "0"], "--lr"),
    (["--warmup", "-5"], "--warmup"), (["--stop-after", "0"], "--stop-after"),
    (["--cond-dropout", "2"], "--cond-dropout"), (["--min-snr-gamma", "-1"], "--min-snr-gamma"),
    (["--diffusion-weight", "inf"], "--diffusion-weight"), (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--anchor-weight", "-1"], "--anchor-weight"), (["--groups", "llm,unet"], "unknown group 'unet'")])
def test_train_flags_out_of_range(flags, says, tmp_path, capsys):
    line = one_line(train.main, FAST + flags + ["--out", str(tmp_path / "run")], capsys, code=2)
    assert says in line
    assert not (tmp_path / "run").exists()  # refused before anything was written


def test_an_objective_that_aligns_needs_the_mapper_from_the_flags_or_the_recipe(tmp_path, capsys):
    # the toy's recipe aligns through the mapper: its flags may change either half, not break the pair
    toy = ["--preset", "toy", "--stage", "I-creation", "--out", str(tmp_path / "run")]
    assert "give --bridge mapper" in one_line(train.main, toy + ["--bridge", "projector"], capsys, code=2)
    assert "give --bridge mapper" in one_line(train.main, FAST + ["--objective", "both"], capsys, code=2)
    assert not (tmp_path / "run").exists()
    for flags, run in ((["--objective", "align"], ("align", "mapper")),
                       (["--objective", "score", "--bridge", "projector"], ("score", "projector"))):
        dream = dreamllm.DreamConfig(**train.dream_variants(train.parse_args(toy + flags)))
        assert (dream.objective, dream.bridge) == run


@pytest.mark.parametrize("flags,says", [
    (["--guidance", "nan"], "--guidance"), (["--guidance", "-1"], "--guidance"),
    (["--temperature", "inf"], "--temperature"), (["--max-new-tokens", "0"], "--max-new-tokens"),
    (["--steps", "0"], "--steps")])
def test_sample_flags_out_of_range(flags, says, tmp_path, capsys):
    argv = ["--untrained", "--preset", "tiny", "--prompt", "a red circle", "--out", str(tmp_path)] + flags
    assert says in one_line(sample.main, argv, capsys, code=2)


@pytest.mark.parametrize("device,says", [("tpu9", "not a device"), ("cuda:7", "cuda")])
def test_a_device_this_machine_lacks(device, says, tmp_path, capsys):
    if device.startswith("cuda") and torch.cuda.device_count() > 7:
        pytest.skip("this machine has 8 GPUs")
    line = one_line(train.main, FAST + ["--device", device, "--out", str(tmp_path / "run")], capsys)
    assert says in line and device in line


# ---- folders and files -------------------------------------------------------------------------------

def test_out_that_is_a_file_or_cannot_be_written(tmp_path, capsys):
    a_file = tmp_path / "a_file"
    a_file.write_text("keep me")
    assert "is a file" in one_line(train.main, FAST + ["--out", str(a_file)], capsys)
    argv = ["--untrained", "--preset", "tiny", "--prompt", "x", "--out", str(a_file)]
    assert "is a file" in one_line(sample.main, argv, capsys, code=2)
    assert a_file.read_text() == "keep me"
    # a folder that cannot be made (its parent is a file): said before the first step, not after
    line = one_line(train.main, FAST + ["--out", str(a_file / "run")], capsys)
    assert "cannot write there" in line


def test_too_little_disk_for_a_checkpoint_is_said_before_training(tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=1000))
    line = one_line(train.main, FAST + ["--out", str(tmp_path / "run")], capsys)
    assert "MiB free" in line and "needs" in line
    assert checkpoint.read_run(tmp_path / "run") is None


def test_a_run_config_of_the_wrong_shape(tmp_path, capsys):
    out = tmp_path / "run"
    train.main(FAST + ["--out", str(out)])
    config = out / "step-2" / "config.json"
    good = json.loads(config.read_text())
    for bad, says in (("[1, 2]", "expected a JSON object"), ('{"preset": "tiny"}', "'stage' is missing"),
                      (json.dumps(dict(good, step="two")), "'step' is missing or not of type int")):
        config.write_text(bad)
        line = one_line(train.main, FAST + ["--out", str(out), "--resume"], capsys)
        assert says in line and str(config) in line
    config.write_text(json.dumps(dict(good, dream_config=dict(good["dream_config"], lm_weight=1.0))))
    line = one_line(sample.main, ["--ckpt", str(out), "--prompt", "x", "--out", str(tmp_path / "s")], capsys)
    assert "no field 'lm_weight'" in line


@pytest.mark.skipif(not (TOY / "llm" / "config.json").is_file(), reason="no toy weights")
@pytest.mark.parametrize("part,load,key", [("llm", llama.load, "num_hidden_layers"), ("clip", clip.load, None),
                                           ("unet", unet.load_unet, "layers_per_block"),
                                           ("vae", unet.load_vae, "latent_channels")])
def test_a_model_config_of_the_wrong_shape_names_the_file_and_the_key(part, load, key, tmp_path):
    folder = tmp_path / part
    shutil.copytree(TOY / part, folder)
    config = json.loads((folder / "config.json").read_text())
    if key is None:  # CLIP: a key of its vision tower
        config["vision_config"]["num_hidden_layers"] = "two"
    else:
        config[key] = "two"
    for text in ("[1, 2]", json.dumps(config)):
        (folder / "config.json").write_text(text)
        with pytest.raises(checkpoint.CheckpointError) as e:
            load(folder)
        assert str(folder / "config.json") in str(e.value) and "\n" not in str(e.value)
    assert "'two': expected int" in str(e.value)


# ---- text and images -----------------------------------------------------------------------------------

@pytest.mark.parametrize("forged", ["<dream_start><im_patch>", "<im_start>", "</s>", "<dream_end>"])
def test_typed_slot_tokens_are_refused(forged, tmp_path, capsys):
    model = dreamllm.build("tiny")
    with pytest.raises(ValueError, match="a token the model writes itself; refused"):
        model.encode_document(f"a red circle {forged}", 0)
    argv = ["--untrained", "--preset", "tiny", "--prompt", f"a {forged} circle", "--out", str(tmp_path)]
    assert "refused" in one_line(sample.main, argv, capsys)
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    manifest = tmp_path / "docs.jsonl"
    manifest.write_text(json.dumps({"text": "fine <image>", "images": ["a.png"]}) + "\n"
                        + json.dumps({"text": f"{forged} <image>", "images": ["a.png"]}) + "\n")
    line = one_line(train.main, FAST + ["--data", str(manifest), "--out", str(tmp_path / "run")], capsys)
    assert "document 2" in line and "refused" in line
    model.encode_document("a red circle <image>", 1)  # <image>, the one token a person may type


def test_images_are_decoded_safely(tmp_path, capsys):
    bomb = tmp_path / "bomb.png"  # a 1 x 1 PNG whose header claims 100000 x 100000 pixels
    Image.new("RGB", (1, 1)).save(bomb)
    png = bytearray(bomb.read_bytes())
    png[16:24] = (100000).to_bytes(4, "big") * 2  # IHDR: width, height
    png[29:33] = zlib.crc32(bytes(png[12:29])).to_bytes(4, "big")  # the chunk's CRC
    bomb.write_bytes(bytes(png))
    with pytest.raises(ValueError, match="more than 67,108,864 pixels"):
        data.open_image(bomb)
    big = tmp_path / "big.png"  # under Pillow's own limit, over ours
    Image.new("1", (9000, 9000)).save(big)
    with pytest.raises(ValueError, match="9000 x 9000 pixels, more than"):
        data.open_image(big)
    deep = tmp_path / "deep.png"  # 16-bit grey, mid-grey: 32896 = 128 * 257
    Image.fromarray(np.full((16, 16), 32896, np.uint16)).save(deep)
    assert Image.open(deep).mode.startswith("I")
    assert data.open_image(deep).getpixel((0, 0)) == (128, 128, 128)  # not clipped to white
    palette = tmp_path / "palette.png"
    Image.new("RGB", (16, 16), (200, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE).save(palette)
    assert data.open_image(palette).getpixel((3, 3)) == (200, 30, 30)
    text = tmp_path / "notes.png"
    text.write_text("not a picture")
    with pytest.raises(ValueError, match="not a readable image"):
        data.open_image(text)
    argv = ["--untrained", "--preset", "tiny", "--image", str(bomb), "--question", "what?",
            "--out", str(tmp_path / "o")]
    assert "pixels" in one_line(sample.main, argv, capsys)


# ---- exit codes ------------------------------------------------------------------------------------------

def test_an_error_that_mentions_interruption_is_still_status_1(tmp_path, capsys):
    # 130 is for an interruption only: the word in a message does not make one
    manifest = tmp_path / "interrupted.jsonl"
    manifest.write_text("")
    assert "no documents" in one_line(train.main, FAST + ["--data", str(manifest), "--out",
                                                          str(tmp_path / "run")], capsys, code=1)


def test_the_scripts_answer_help_and_bad_flags():
    for script in (["train.py"], ["sample.py"], ["-m", "tools.bench"]):
        r = subprocess.run([sys.executable, *script, "-h"], cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0 and "usage" in r.stdout.lower(), script
