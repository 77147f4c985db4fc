"""Downloading the official weights, every file checked, with nothing but the standard library.

    python -m weights.download --list
    python -m weights.download vicuna-7b-v1.1 clip-vit-large-patch14 sd-2.1-base [--dir weights/]

Each name below is one Hugging Face repository; its files land in DIR/NAME/ with the repository's
own layout (config.json beside the weights), which is what llama.load, clip.load and unet.load_* read.
A download is written to FILE.part and renamed to FILE only once it is complete and matches the size
and sha256 the registry knows and those the hub's own headers give, so a file at its final path is
always a whole, verified one; the sha256 it was verified with is kept beside it in FILE.sha256
(`sha256sum -c` reads it) for a rerun to check it against.
Interrupted? Run the same command again: it resumes from the .part with an HTTP Range request.

HF_ENDPOINT overrides https://huggingface.co (a mirror; the tests' local server). HF_TOKEN is sent as
a bearer token, for repositories that ask you to accept a licence first.

Sizes and sha256 values are the Git LFS pointers the hub shows for each file at the pinned revision;
None where we could not read one (the file is then checked against the hub's headers only); where
each known value was read is noted under REGISTRY.
"""
import argparse
import errno
import hashlib
import http.client
import os
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from tqdm import tqdm

ENDPOINT = "https://huggingface.co"
CHUNK = 1 << 20


def f(path, size=None, sha256=None, approx=None):
    # size: exact bytes (checked); approx: the hub's rounded figure, only for --list when size is unknown
    return {"path": path, "size": size, "sha256": sha256, "approx": approx}


def _vicuna(repo):  # the layout both Vicuna repos share: two fp16 .bin shards and their index
    return {"repo": repo, "revision": "main", "files": [
        f("config.json"), f("generation_config.json"), f("special_tokens_map.json"), f("tokenizer_config.json"),
        f("tokenizer.model", approx=500e3), f("pytorch_model.bin.index.json"),
        f("pytorch_model-00001-of-00002.bin", approx=9.98e9), f("pytorch_model-00002-of-00002.bin", approx=3.5e9)]}


def _sd(repo, unet_approx, text_approx, unet_sha256=None):  # a diffusers pipeline: the parts we use, safetensors only
    return {"repo": repo, "revision": "main", "files": [
        f("model_index.json"), f("scheduler/scheduler_config.json"),
        f("unet/config.json"), f("unet/diffusion_pytorch_model.safetensors", None, unet_sha256, unet_approx),
        f("vae/config.json"), f("vae/diffusion_pytorch_model.safetensors", approx=335e6),
        # SD's own text encoder, for the plain-SD baseline beside DreamLLM
        f("text_encoder/config.json"), f("text_encoder/model.safetensors", approx=text_approx),
        f("tokenizer/merges.txt"), f("tokenizer/vocab.json"), f("tokenizer/special_tokens_map.json"),
        f("tokenizer/tokenizer_config.json")]}


def _dreamllm(repo, revision, pytorch_model, clip_embedding):
    # One LLM file in HF Llama names (+ 8 added tokens), and the three plugin files the official code
    # saves beside it: CLIP + its projector, the dream queries, SD's UNet/VAE + the condition projector.
    return {"repo": repo, "revision": revision, "files": [
        f("config.json"), f("generation_config.json"), f("added_tokens.json"), f("special_tokens_map.json"),
        f("tokenizer_config.json"), f("tokenizer.model"),
        f("pytorch_model.bin", *pytorch_model, approx=13.5e9), f("clip_vision_embedding.bin", *clip_embedding),
        f("dream_embedding.bin"), f("stable_diffusion_head.bin")]}


REGISTRY = {
    "vicuna-7b-v1.1": _vicuna("lmsys/vicuna-7b-v1.1"),
    "vicuna-7b-v1.5": _vicuna("lmsys/vicuna-7b-v1.5"),
    "clip-vit-large-patch14": {"repo": "openai/clip-vit-large-patch14", "revision": "main", "files": [
        f("config.json"), f("preprocessor_config.json"), f("vocab.json"), f("merges.txt"),  # its text's BPE: --best-of
        f("model.safetensors", 1710540580, "a2bf730a0c7debf160f7a6b50b3aaf3703e7e88ac73de7a314903141db026dcb")]},
    "sd-2.1-base": _sd("stabilityai/stable-diffusion-2-1-base", 3.46e9, 1.36e9,
                       unet_sha256="6dfae3e5f7d459b50f4b0850ead945972c75bb0e1897628933e169eb43974214"),
    # runwayml/stable-diffusion-v1-5 was taken down in 2024; this is the mirror the hub points to now
    "sd-1.5": _sd("stable-diffusion-v1-5/stable-diffusion-v1-5", 3.44e9, 492e6),
    "dreamllm-7b-chat": _dreamllm(
        "RunpeiDong/dreamllm-7b-chat-v1.0", "main", pytorch_model=(None, None),
        clip_embedding=(614896585, "9278c079148131df640e45f35d3dc9c26d09443c2eb5b45b4becedb0042974bf")),
    "dreamllm-7b-chat-aesthetic": _dreamllm(
        "RunpeiDong/dreamllm-7b-chat-aesthetic-v1.0", "main",
        pytorch_model=(None, "2719d78f070e0808e0091362bba0d5c79015cc956a4722b7a6d353b1d6363d48"),
        clip_embedding=(614902217, "34de1cf8ae92bce7e698ebdc57d1d85dcc7ef33f908fe7d44caaa6e3a17bc7d7")),
}

# Where the known values were read (the hub's file pages and commit diffs show each LFS pointer's
# oid sha256 and size): CLIP model.safetensors from copies of the openai repo that keep its pointer
# (e.g. InvokeAI/clip-vit-large-patch14 "Copy from openai/clip-vit-large-patch14"); the SD 2.1-base
# UNet from its own blob page; DreamLLM's from the initial commits 79149bb (chat) and f29b6d8
# (aesthetic) and the aesthetic pytorch_model.bin blob page.

class DownloadError(Exception):
    pass


_DISK_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _tag(value, digits):  # an ETag's hex digest, without W/ and quotes; None if it is not one
    value = (value or "").removeprefix("W/").strip('"').lower()
    return value if re.fullmatch(f"[0-9a-f]{{{digits}}}", value) else None


class _Hub(urllib.request.HTTPRedirectHandler):
    # The hub answers /resolve/ with a redirect to its CDN (signed URLs). The token must go to the
    # hub only: another host gets the redirect without it (a signed URL refuses a second
    # credential). What the file is rides on the hub's own replies, so they are heard here: an LFS
    # file's redirect carries X-Linked-Size and X-Linked-Etag (its sha256, quoted); a small file
    # kept in git comes straight from the hub, its ETag the git blob sha1 (of b"blob SIZE\0" + the
    # bytes), not a sha256. A CDN's ETag is its own (an MD5, an S3 multipart tag): never read.
    def __init__(self, url):
        self.host = urllib.parse.urlsplit(url).netloc
        self.size = self.sha256 = self.sha1 = None

    def hear(self, headers, final=False):
        size = headers.get("X-Linked-Size") or ""
        self.size = int(size) if size.isdigit() else self.size
        self.sha256 = _tag(headers.get("X-Linked-Etag"), 64) or self.sha256
        if final and not self.sha256:  # the body itself comes from the hub: a file kept in git
            self.sha1 = _tag(headers.get("ETag"), 40)

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if urllib.parse.urlsplit(req.full_url).netloc == self.host:
            self.hear(headers)
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != self.host:
            new.remove_header("Authorization")
        return new


def url_for(repo, path, revision="main", endpoint=None):
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or ENDPOINT).rstrip("/")
    return f"{endpoint}/{repo}/resolve/{revision}/{urllib.parse.quote(path)}"


def _hash_of(path, h=None):
    h = h or hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(CHUNK):
            h.update(block)
    return h


def _check(dest, path, got_size, got_sha, size, sha256, sha1=None):
    if size is not None and got_size != size:
        return f"{dest.name}: {got_size} bytes, expected {size}"
    if sha256 is not None and got_sha != sha256:
        return f"{dest.name}: sha256 {got_sha}, expected {sha256}"
    if sha1 is not None:  # the bytes as git stores them: b"blob SIZE\0" + the file
        got = _hash_of(path, hashlib.sha1(b"blob %d\0" % got_size)).hexdigest()
        if got != sha1:
            return f"{dest.name}: git blob sha1 {got}, expected {sha1} (the hub's ETag)"
    return None


def _open(url, token=None, offset=0, timeout=60):
    # The reply (None where the server refuses the Range) and the _Hub that heard what the file is
    hub = _Hub(url)
    agent = {"User-Agent": "dreamllm-from-scratch/weights.download"}
    req = urllib.request.Request(url, headers=agent)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    if offset:
        req.add_header("Range", f"bytes={offset}-")
    try:
        resp = urllib.request.build_opener(hub).open(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code in (401, 403):
            how = ("HF_TOKEN was refused: is it valid, and" if token
                   else "set HF_TOKEN to a Hugging Face access token,")
            raise DownloadError(f"{url}: HTTP {e.code}, the repository is gated; {how} accept its "
                                f"licence on the model's page on huggingface.co") from None
        if e.code == 404:
            raise DownloadError(f"{url}: HTTP 404, no such file") from None
        if e.code == 416 and offset:
            return None, hub
        raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from None
    except (urllib.error.URLError, OSError) as e:
        raise DownloadError(f"{url}: cannot connect ({getattr(e, 'reason', e)})") from None
    if urllib.parse.urlsplit(resp.geturl()).netloc == hub.host:  # the body is the hub's own reply
        hub.hear(resp.headers, final=True)
    return resp, hub


def download(url, dest, sha256=None, size=None, token=None, progress=True, timeout=60):
    """Fetch `url` to `dest`, resuming `dest`.part if there is one. Returns "present" (already there
    and verified) or "downloaded". Raises DownloadError with a one-line message on any failure."""
    dest = Path(dest)
    part = dest.with_name(dest.name + ".part")
    if dest.exists():  # only ever put there complete and verified, unless a person put it there
        return _present(url, dest, sha256, size, token, timeout)
    dest.parent.mkdir(parents=True, exist_ok=True)

    offset = part.stat().st_size if part.exists() else 0
    if size is not None and offset > size:  # longer than the file can be: start over
        part.unlink()
        offset = 0
    # sha256 of the bytes already there, so the hash is done when the last byte arrives
    h = _hash_of(part) if offset else hashlib.sha256()
    if size is not None and offset == size:
        return _finish(dest, part, offset, h, size, sha256)

    resp, hub = _open(url, token, offset, timeout)
    if resp is None:  # HTTP 416: the .part is not a prefix the server recognises: start over
        part.unlink()
        return download(url, dest, sha256, size, token, progress, timeout)

    with resp:
        start = re.match(r"bytes (\d+)-", resp.headers.get("Content-Range") or "")
        if offset and (resp.status != 206 or not start or int(start[1]) != offset):
            offset, h = 0, hashlib.sha256()  # the server ignored Range and sends the whole file: restart
        for what, ours, hubs in (("size", size, hub.size), ("sha256", sha256, hub.sha256)):
            if ours is not None and hubs is not None and ours != hubs:
                raise DownloadError(f"{dest.name}: the registry's {what} is {ours}, the hub's "
                                    f"{hubs} (the file changed upstream?); nothing saved")
        size, sha256 = size if size is not None else hub.size, sha256 or hub.sha256
        # Without Content-Length the end of the body is where the connection closes: only the size
        # known tells a whole file from a cut one (a short body stays a .part, to resume)
        length = resp.headers.get("Content-Length")
        total = offset + int(length) if length is not None else size
        if total is None and sha256 is None and hub.sha1 is None:
            # Nothing says how long the file is or what it hashes to: a connection closed early
            # would look exactly like its end. Refused rather than kept unverified.
            raise DownloadError(f"{dest.name}: {url} gives no size and no checksum, so a file cut "
                                "short could not be told from a whole one; nothing saved")
        received = offset
        bar = tqdm(total=total, initial=offset, unit="B", unit_scale=True, unit_divisor=1024,
                   desc=dest.name, disable=not progress, leave=False)
        try:
            block = resp.read(CHUNK)  # looked at before the .part is opened (and maybe truncated)
            head = b"" if offset else block.lstrip()[:14].lower()  # a resumed body starts mid-file
            page = head.startswith((b"<!doctype html", b"<html"))
            if page or resp.headers.get_content_type() == "text/html":
                raise DownloadError(f"{dest.name}: {url} sent a web page instead of the file "
                                    "(a proxy or login page?); nothing saved")
            with open(part, "ab" if offset else "wb") as out:
                while block:
                    out.write(block)
                    h.update(block)
                    received += len(block)
                    bar.update(len(block))
                    block = resp.read(CHUNK)
        except (OSError, http.client.HTTPException) as e:
            if getattr(e, "errno", None) in _DISK_FULL:  # the write failed, not the connection
                need = f" ({total - received} more bytes needed)" if total else ""
                raise DownloadError(f"{dest.name}: disk full in {dest.parent}{need}; free space "
                                    "there and run the same command again to resume") from None
            # a dropped connection: IncompleteRead, reset, timeout
            raise DownloadError(f"{dest.name}: connection lost after {received} of {total or '?'} bytes "
                                f"({type(e).__name__}); run the same command again to resume") from None
        finally:
            bar.close()
    if total is not None and received < total:
        raise DownloadError(f"{dest.name}: connection closed after {received} of {total} bytes; "
                            f"run the same command again to resume")
    return _finish(dest, part, received, h, size, sha256, hub.sha1)


def _finish(dest, part, got_size, h, size, sha256, sha1=None):
    problem = _check(dest, part, got_size, h.hexdigest(), size, sha256, sha1)
    if problem:
        # A complete file with the wrong bytes cannot be resumed into the right one: remove it.
        part.unlink()
        raise DownloadError(f"{problem}; the download was removed, run the command again to fetch it afresh")
    # What FILE was verified as, for a rerun to check (sha256sum's format); first, so none lacks it
    dest.with_name(dest.name + ".sha256").write_text(f"{h.hexdigest()}  {dest.name}\n")
    os.replace(part, dest)  # atomic: the final name appears only now
    return "downloaded"


def _present(url, dest, sha256, size, token, timeout):
    sha1, sidecar = None, dest.with_name(dest.name + ".sha256")
    if sha256 is None and sidecar.exists():
        sha256 = _tag(sidecar.read_text()[:64], 64)
    if sha256 is None:
        # Never verified where it lies: an older version of this script kept a body cut short when
        # no size was known, or a person put it there. The hub's headers settle it; a file that
        # nothing can be checked against is never called present.
        resp, hub = _open(url, token, 0, timeout)
        resp.close()
        size, sha256, sha1 = size if size is not None else hub.size, hub.sha256, hub.sha1
        if sha256 is None and sha1 is None:
            raise DownloadError(f"{dest.name}: {dest} was never verified and {url} gives no sha256 "
                                "to check it against; delete it to download it again")
    got = _hash_of(dest).hexdigest()
    problem = _check(dest, dest, dest.stat().st_size, got, size, sha256, sha1)
    if problem:
        raise DownloadError(f"{problem}: {dest} is not the official file; delete it and rerun")
    if not sidecar.exists():
        sidecar.write_text(f"{got}  {dest.name}\n")
    return "present"


def fetch(name, folder, token=None, progress=True):
    entry = REGISTRY[name]
    for i, file in enumerate(entry["files"], 1):
        url = url_for(entry["repo"], file["path"], entry["revision"])
        dest = Path(folder) / name / file["path"]
        status = download(url, dest, file["sha256"], file["size"], token, progress)
        check = "sha256 ok" if file["sha256"] else "checked against the hub's headers"
        print(f"[{name} {i}/{len(entry['files'])}] {file['path']}: {status} ({check})", flush=True)


def _size(file):
    n = file["size"] or file["approx"]
    if n is None:
        return "small" if file["path"].endswith((".json", ".txt")) else "?"
    return ("" if file["size"] else "~") + (f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.1f} MB")


def list_registry():
    for name, entry in REGISTRY.items():
        total = sum(file["size"] or file["approx"] or 0 for file in entry["files"])
        hashed = sum(file["sha256"] is not None for file in entry["files"])
        print(f"{name}  ({entry['repo']}@{entry['revision']}: {len(entry['files'])} files, ~{total / 1e9:.1f} GB, "
              f"{hashed} with a known sha256)")
        for file in entry["files"]:
            print(f"    {file['path']:<42} {_size(file):>9}  {file['sha256'] or '-'}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m weights.download", description=__doc__.split("\n\n")[0],
                                     epilog="names: " + ", ".join(REGISTRY))
    parser.add_argument("names", nargs="*", metavar="NAME", help="what to download (see --list)")
    parser.add_argument("--dir", default="weights", help="where NAME/ folders go (default: weights/)")
    parser.add_argument("--list", action="store_true", help="print the registry: names, files, sizes, sha256")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    if args.list:
        list_registry()
        return 0
    if not args.names:
        parser.error("name what to download, or --list")
    unknown = [n for n in args.names if n not in REGISTRY]
    if unknown:
        parser.error(f"unknown name {unknown[0]!r}; choose from {', '.join(REGISTRY)}")
    try:
        for name in args.names:
            fetch(name, args.dir, os.environ.get("HF_TOKEN") or None, progress=not args.quiet)
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except OSError as e:  # the disk filled outside a download's body (a folder, a FILE.sha256)
        if e.errno not in _DISK_FULL:
            raise
        print(f"error: disk full writing {e.filename}; free space and run again", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
