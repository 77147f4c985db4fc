# weights/download.py against a local HTTP server on 127.0.0.1 (a thread, an ephemeral port) that
# misbehaves on purpose: cut connections, wrong bytes, 404, a gated repository, Range ignored, a
# redirect to another host, the hub's own headers, a login page, a full disk. Never the network.
import errno
import hashlib
import http.server
import io
import os
import socket
import threading

import pytest

from weights import download as dl

DATA = os.urandom(3 * dl.CHUNK + 12345)  # a few read blocks, so a cut lands mid-file
SHA = hashlib.sha256(DATA).hexdigest()
GIT_SHA1 = hashlib.sha1(b"blob %d\0" % len(DATA) + DATA).hexdigest()  # `git hash-object` of DATA
PAGE = b"<!DOCTYPE html>\n<html><body>Sign in to continue</body></html>"
TOKEN = "hf_secret"


class Handler(http.server.BaseHTTPRequestHandler):
    # What to do is in the path's first part: /ok, /cut (the first reply stops half-way), /wrong,
    # /gated (401 without the token), /forbidden (403), /norange (Range ignored), /redirect (302 to
    # "localhost", another host name for the same server); /lfs/MODE/... (the hub's redirect of an
    # LFS file: 302 to localhost's /MODE/..., with X-Linked-Size and X-Linked-Etag from srv.linked),
    # /nolength (no Content-Length: the body ends where the connection closes; cut like /cut),
    # /git (a file kept in git: ETag srv.etag), /html (a page told only by its Content-Type) and
    # /page (a login page sent as application/octet-stream); anything else is a 404.
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):  # keep pytest's output clean
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, dict(self.headers)))
        mode = self.path.split("/")[1]
        if mode in ("redirect", "lfs"):
            self.send_response(302)
            rest = ("/ok" if mode == "redirect" else "") + self.path[len(mode) + 1:]
            self.send_header("Location", f"http://localhost:{srv.server_port}{rest}")
            if mode == "lfs":
                self.send_header("X-Linked-Size", str(srv.linked[0]))
                self.send_header("X-Linked-Etag", f'"{srv.linked[1]}"')
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if mode in ("html", "page"):
            self.send_response(200)
            kind = "text/html; charset=utf-8" if mode == "html" else "application/octet-stream"
            self.send_header("Content-Type", kind)
            page = PAGE if mode == "page" else b"<p>Sign in to continue</p>"
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            return self.wfile.write(page)
        if mode in ("gated", "forbidden") and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            self.send_response(401 if mode == "gated" else 403)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        if mode not in ("ok", "cut", "wrong", "gated", "forbidden", "norange", "nolength", "git"):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            return self.end_headers()
        body = DATA if mode != "wrong" else bytes(len(DATA))
        start = 0
        rng = self.headers.get("Range")
        if rng and mode != "norange":
            start = int(rng.removeprefix("bytes=").split("-")[0])
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        else:
            self.send_response(200)
        if mode == "git":
            self.send_header("ETag", f'"{srv.etag}"')
        if mode == "nolength":
            self.send_header("Connection", "close")
            self.close_connection = True
        else:
            self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        if mode in ("cut", "nolength") and srv.cuts > 0:  # send half of the file, hang up
            srv.cuts -= 1
            self.wfile.write(body[start:start + (len(body) - start) // 2])
            self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    srv.requests, srv.cuts, srv.linked, srv.etag = [], 1, (len(DATA), SHA), GIT_SHA1
    thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def url(srv, mode):
    return dl.url_for("org/model", "sub dir/model.bin", "main", endpoint=f"http://127.0.0.1:{srv.server_port}/{mode}")


def test_plain_download_is_verified_and_atomic(server, tmp_path):
    dest = tmp_path / "m" / "model.bin"
    assert dl.download(url(server, "ok"), dest, SHA, len(DATA), progress=False) == "downloaded"
    assert dest.read_bytes() == DATA and not dest.with_name("model.bin.part").exists()
    assert server.requests[0][0] == "/ok/org/model/resolve/main/sub%20dir/model.bin"  # the hub's URL layout
    # a second call finds it there, checks it, and fetches nothing
    assert dl.download(url(server, "ok"), dest, SHA, len(DATA), progress=False) == "present"
    assert len(server.requests) == 1


def test_cut_connection_resumes_with_range(server, tmp_path):
    dest = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    with pytest.raises(dl.DownloadError, match="run the same command again to resume") as e:
        dl.download(url(server, "cut"), dest, SHA, len(DATA), progress=False)
    assert "\n" not in str(e.value)
    assert not dest.exists() and 0 < part.stat().st_size < len(DATA)
    kept = part.stat().st_size
    assert dl.download(url(server, "cut"), dest, SHA, len(DATA), progress=False) == "downloaded"
    assert server.requests[-1][1]["Range"] == f"bytes={kept}-"
    assert dest.read_bytes() == DATA and not part.exists()


def test_server_ignoring_range_restarts_cleanly(server, tmp_path):
    dest = tmp_path / "model.bin"
    (tmp_path / "model.bin.part").write_bytes(b"garbage that is not a prefix")
    assert dl.download(url(server, "norange"), dest, SHA, len(DATA), progress=False) == "downloaded"
    assert "Range" in server.requests[0][1]  # it asked to resume; the 200 reply made it start over
    assert dest.read_bytes() == DATA


def test_sha256_mismatch_removes_everything(server, tmp_path):
    dest = tmp_path / "model.bin"
    with pytest.raises(dl.DownloadError, match="sha256 .* expected .*removed") as e:
        dl.download(url(server, "wrong"), dest, SHA, len(DATA), progress=False)
    assert "\n" not in str(e.value)
    # nothing at the final path, and no .part: a complete wrong file cannot be resumed into a right one
    assert list(tmp_path.iterdir()) == []


def test_size_mismatch_without_hash(server, tmp_path):
    with pytest.raises(dl.DownloadError, match="bytes, expected"):
        dl.download(url(server, "ok"), tmp_path / "model.bin", None, len(DATA) + 1, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_unknown_hash_still_downloads(server, tmp_path):
    assert dl.download(url(server, "ok"), tmp_path / "model.bin", progress=False) == "downloaded"
    assert (tmp_path / "model.bin").read_bytes() == DATA


def test_404_names_the_url(server, tmp_path):
    with pytest.raises(dl.DownloadError) as e:
        dl.download(url(server, "missing"), tmp_path / "model.bin", progress=False)
    assert str(e.value) == f"{url(server, 'missing')}: HTTP 404, no such file"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode,code", [("gated", 401), ("forbidden", 403)])
def test_gated_repository(server, tmp_path, mode, code):
    dest = tmp_path / "model.bin"
    with pytest.raises(dl.DownloadError, match=f"HTTP {code}, the repository is gated; set HF_TOKEN") as e:
        dl.download(url(server, mode), dest, SHA, len(DATA), progress=False)
    assert "accept its licence" in str(e.value) and "\n" not in str(e.value)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(dl.DownloadError, match="HF_TOKEN was refused"):
        dl.download(url(server, mode), dest, SHA, len(DATA), token="hf_wrong", progress=False)
    assert dl.download(url(server, mode), dest, SHA, len(DATA), token=TOKEN, progress=False) == "downloaded"
    assert server.requests[-1][1]["Authorization"] == f"Bearer {TOKEN}"
    assert dest.read_bytes() == DATA


def test_token_not_forwarded_to_another_host(server, tmp_path):
    # the hub redirects /resolve/ to its CDN; the token must stay with the hub
    dest = tmp_path / "model.bin"
    assert dl.download(url(server, "redirect"), dest, SHA, len(DATA), token=TOKEN, progress=False) == "downloaded"
    (first, h1), (second, h2) = server.requests
    assert h1["Authorization"] == f"Bearer {TOKEN}" and "Authorization" not in h2
    assert h2["Host"].startswith("localhost") and dest.read_bytes() == DATA


def test_a_wrong_file_already_in_place_is_reported(server, tmp_path):
    dest = tmp_path / "model.bin"
    dest.write_bytes(b"not it")
    with pytest.raises(dl.DownloadError, match="is not the official file; delete it"):
        dl.download(url(server, "ok"), dest, SHA, len(DATA), progress=False)
    assert dest.read_bytes() == b"not it"


def test_cli(server, tmp_path, monkeypatch, capsys):
    files = [dl.f("config.json"), dl.f("weights/model.bin", len(DATA), SHA)]
    monkeypatch.setitem(dl.REGISTRY, "test-model", {"repo": "org/model", "revision": "main", "files": files})
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}/gated")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert dl.main(["test-model", "--dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "gated" in err and "Traceback" not in err
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    assert dl.main(["test-model", "--dir", str(tmp_path), "--quiet"]) == 0
    assert (tmp_path / "test-model" / "weights" / "model.bin").read_bytes() == DATA
    assert "sha256 ok" in capsys.readouterr().out
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}/missing")
    assert dl.main(["test-model", "--dir", str(tmp_path / "other"), "--quiet"]) == 1
    assert "HTTP 404" in capsys.readouterr().err
    assert dl.main(["--list"]) == 0
    assert "dreamllm-7b-chat" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        dl.main(["no-such-model"])


def test_registry_is_well_formed():
    for name, entry in dl.REGISTRY.items():
        assert entry["repo"].count("/") == 1 and entry["files"], name
        for file in entry["files"]:
            assert file["sha256"] is None or len(file["sha256"]) == 64 and int(file["sha256"], 16) >= 0
            assert file["size"] is None or file["size"] > 0


def test_hub_headers_check_a_file_the_registry_does_not_know(server, tmp_path):
    dest = tmp_path / "model.bin"
    assert dl.download(url(server, "lfs/ok"), dest, progress=False) == "downloaded"
    assert dest.read_bytes() == DATA
    assert (tmp_path / "model.bin.sha256").read_text() == f"{SHA}  model.bin\n"  # sha256sum -c
    other = tmp_path / "other.bin"
    with pytest.raises(dl.DownloadError, match=f"sha256 .*, expected {SHA}; the download was"):
        dl.download(url(server, "lfs/wrong"), other, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "model.bin.sha256"]


def test_git_blob_sha1_etag_is_checked(server, tmp_path):
    assert dl.download(url(server, "git"), tmp_path / "config.json", progress=False) == "downloaded"
    server.etag = "0" * 40
    with pytest.raises(dl.DownloadError, match=f"git blob sha1 {GIT_SHA1}, expected 0{{40}}"):
        dl.download(url(server, "git"), tmp_path / "m" / "config.json", progress=False)
    assert list((tmp_path / "m").iterdir()) == []


def test_cut_short_without_content_length_stays_a_part(server, tmp_path):
    dest = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    with pytest.raises(dl.DownloadError, match=f"closed after .* of {len(DATA)} bytes; run"):
        dl.download(url(server, "lfs/nolength"), dest, progress=False)
    assert not dest.exists() and 0 < part.stat().st_size < len(DATA)
    assert dl.download(url(server, "lfs/nolength"), dest, progress=False) == "downloaded"
    assert server.requests[-1][1]["Range"] == f"bytes={len(DATA) // 2}-"
    assert dest.read_bytes() == DATA


def test_no_size_and_no_checksum_from_anywhere_is_refused(server, tmp_path):
    server.cuts = 0  # even a whole body: nothing could tell it from a cut one
    with pytest.raises(dl.DownloadError, match="gives no size and no checksum, so a file cut"):
        dl.download(url(server, "nolength"), tmp_path / "model.bin", progress=False)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("size,sha,what", [(len(DATA), "0" * 64, "sha256"),
                                           (len(DATA) + 1, SHA, "size")], ids=["sha256", "size"])
def test_registry_and_hub_must_agree(server, tmp_path, size, sha, what):
    with pytest.raises(dl.DownloadError, match=f"the registry's {what} is .*, the hub") as e:
        dl.download(url(server, "lfs/ok"), tmp_path / "model.bin", sha, size, progress=False)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("mode", ["html", "page"])
def test_a_web_page_is_never_saved(server, tmp_path, mode):
    dest = tmp_path / "model.bin"
    part = tmp_path / "model.bin.part"
    part.write_bytes(DATA[:1000])  # an interrupted download, which the page must not overwrite
    with pytest.raises(dl.DownloadError, match="web page instead of the file .a proxy or login"):
        dl.download(url(server, mode), dest, progress=False)
    assert not dest.exists() and part.read_bytes() == DATA[:1000]
    with pytest.raises(dl.DownloadError, match="web page"):
        dl.download(url(server, mode), tmp_path / "config.json", progress=False)
    assert not (tmp_path / "config.json").exists()


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT], ids=["ENOSPC", "EDQUOT"])
def test_disk_full_is_not_a_lost_connection(server, tmp_path, monkeypatch, capsys, code):
    class Full(io.BytesIO):
        def write(self, block):
            raise OSError(code, os.strerror(code))

    def full_open(path, mode="r", *args, **kwargs):  # reading works, writing finds the disk full
        return open(path, mode, *args, **kwargs) if "r" in mode else Full()

    monkeypatch.setattr(dl, "open", full_open, raising=False)
    files = [dl.f("weights/model.bin", len(DATA), SHA)]
    entry = {"repo": "org/model", "revision": "main", "files": files}
    monkeypatch.setitem(dl.REGISTRY, "test-model", entry)
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}/ok")
    assert dl.main(["test-model", "--dir", str(tmp_path), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "connection" not in err
    folder = tmp_path / "test-model" / "weights"
    assert f"disk full in {folder} ({len(DATA)} more bytes needed)" in err
    assert not (folder / "model.bin").exists()


def test_a_file_in_place_never_verified_is_checked_against_the_hub(server, tmp_path):
    dest = tmp_path / "model.bin"
    dest.write_bytes(DATA[:len(DATA) // 2])  # what an older version kept of a cut-short download
    with pytest.raises(dl.DownloadError, match=f"bytes, expected {len(DATA)}: .* is not the"):
        dl.download(url(server, "lfs/ok"), dest, progress=False)
    assert dest.read_bytes() == DATA[:len(DATA) // 2]  # a person's file is theirs to delete
    dest.write_bytes(DATA)
    with pytest.raises(dl.DownloadError, match="was never verified and .* gives no sha256"):
        dl.download(url(server, "ok"), dest, progress=False)
    assert dl.download(url(server, "lfs/ok"), dest, progress=False) == "present"
    n = len(server.requests)  # once verified, its FILE.sha256 is what a rerun checks, offline
    assert dl.download(url(server, "missing"), dest, progress=False) == "present"
    dest.write_bytes(DATA[:-1] + b"x")
    with pytest.raises(dl.DownloadError, match="is not the official file"):
        dl.download(url(server, "missing"), dest, progress=False)
    assert len(server.requests) == n
