"""``cvgen data prepare``: bad inputs, HTTP failures (a local server on 127.0.0.1), duplicates,
face detection and the head-and-shoulders crop on the embedded sample portraits, re-runs."""

from __future__ import annotations

import contextlib
import io
import json
import struct
import threading
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from PIL import Image

from cvgen.data.download import HttpConfig
from cvgen.data.metadata import DataError, read_metadata
from cvgen.data.prepare import PrepareConfig, prepare
from cvgen.data.sample import sample_sources, write_sample_set
from cvgen.faces import FaceDetector, head_and_shoulders
from cvgen.images import open_image

CFG = dict(resolution=64, min_size=64, workers=4)


def fast_http(**kw: float) -> HttpConfig:
    """Short timeouts; loopback allowed (the test servers listen on 127.0.0.1)."""
    return HttpConfig(
        connect_timeout=2.0,
        read_timeout=kw.get("read_timeout", 2.0),
        retries=int(kw.get("retries", 1)),
        backoff=0.01,
        max_bytes=int(kw.get("max_bytes", 5 * 2**20)),
        allow_networks=("127.0.0.1/32",),
    )


@pytest.fixture(scope="module")
def raw(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The sample portraits at 256 px (faces large enough for the Haar cascade)."""
    return write_sample_set(tmp_path_factory.mktemp("raw") / "sample", size=256)


@pytest.fixture(scope="module")
def portrait(raw: Path) -> bytes:
    return (raw / "images" / "hopper-full.jpg").read_bytes()


def jpeg(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def png_bomb(width: int = 100_000, height: int = 100_000) -> bytes:
    """A tiny PNG whose header claims ``width`` x ``height`` pixels."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 64))
        + chunk(b"IEND", b"")
    )


def write_jsonl(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def reasons(out: Path) -> dict[str, str]:
    """source file name -> rejection reason, from rejected.jsonl."""
    lines = (out / "rejected.jsonl").read_text(encoding="utf-8").splitlines()
    return {json.loads(x)["source"].rsplit("/", 1)[-1]: json.loads(x)["reason"] for x in lines}


# --- the sample portraits: faces and crops ---------------------------------------------------


def test_detector_finds_one_face_in_each_sample_photo(raw: Path) -> None:
    det = FaceDetector()
    photos = [*sorted((raw / "images").glob("*.jpg")), *sample_sources().values()]
    for p in photos:
        img = open_image(p)
        faces = det.detect(img)
        assert len(faces) == 1, (p.name, faces)
        f = faces[0]
        # a face, not the whole frame: in the upper part, a plausible size
        assert 0.1 * img.height < f.h < 0.7 * img.height, (p.name, f)
        assert f.y + f.h / 2 < 0.6 * img.height, (p.name, f)


def test_prepare_sample_set_frames_each_face(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    s = prepare(raw, out, PrepareConfig(resolution=128, min_size=128, workers=4), progress=False)
    assert (s.rows, s.accepted, s.rejected) == (8, 8, {})
    records = read_metadata(out)
    assert len(records) == 8
    src_captions = {r.text for r in read_metadata(raw)}
    det = FaceDetector(min_face=0.2)
    for r in records:
        assert r.text in src_captions
        img = open_image(r.path)
        assert img.size == (128, 128)
        faces = det.detect(img)
        assert len(faces) == 1, r.path.name
        cx = faces[0].x + faces[0].w / 2
        assert abs(cx - 64) < 20, (r.path.name, faces[0])  # centred horizontally


def test_head_and_shoulders_keeps_aspect_and_stays_inside() -> None:
    from cvgen.faces import Box

    face = Box(400, 200, 200, 200)
    box = head_and_shoulders(face, 1000, 1500, aspect=0.8, face_fraction=0.35)
    assert abs(box.w / box.h - 0.8) < 0.01
    assert box.x >= 0 and box.y >= 0 and box.x + box.w <= 1000 and box.y + box.h <= 1500
    assert box.x <= face.x and box.x + box.w >= face.x + face.w  # the face is inside
    assert box.y <= face.y and box.y + box.h >= face.y + face.h
    assert abs(face.h / box.h - 0.35) < 0.01  # room for the shoulders


# --- bad local files -------------------------------------------------------------------------


def test_bad_files_are_rejected_with_their_reason(
    raw: Path, portrait: bytes, tmp_path: Path
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    good = open_image(raw / "images" / "collins-full.jpg")
    files = {
        "good.jpg": (raw / "images" / "collins-full.jpg").read_bytes(),
        "truncated.jpg": portrait[: len(portrait) * 2 // 3],
        "bomb.png": png_bomb(),
        "empty.jpg": b"",
        "text.jpg": b"this is not an image, just text\n" * 20,
        "small.jpg": jpeg(good.resize((40, 40))),
        "copy.jpg": (raw / "images" / "collins-full.jpg").read_bytes(),  # exact duplicate
        "reencoded.jpg": jpeg(good.resize((200, 200)), quality=70),  # near duplicate
        "noface.jpg": jpeg(Image.linear_gradient("L").convert("RGB").resize((256, 256))),
        "twofaces.jpg": jpeg(_side_by_side(raw)),
    }
    rows = []
    for name, data in files.items():
        (src / name).write_bytes(data)
        rows.append({"path": name, "caption": f"a professional portrait, {name}"})
    rows.append({"path": "missing.jpg", "caption": "not there"})
    rows.append({"path": "good.jpg", "caption": ""})  # bad caption
    listing = write_jsonl(src / "list.jsonl", rows)
    out = tmp_path / "out"
    s = prepare(listing, out, PrepareConfig(**CFG), progress=False)
    got = reasons(out)
    assert got == {
        "truncated.jpg": "truncated",
        "bomb.png": "decompression_bomb",
        "empty.jpg": "empty_file",
        "text.jpg": "not_an_image",
        "small.jpg": "too_small",
        "copy.jpg": "duplicate",
        "reencoded.jpg": "near_duplicate",
        "noface.jpg": "no_face",
        "twofaces.jpg": "multiple_faces",
        "missing.jpg": "missing_file",
        "good.jpg": "bad_caption",
    }
    assert s.accepted == 1 and s.rows == len(rows)
    assert sum(s.rejected.values()) == len(rows) - 1
    assert json.loads((out / "summary.json").read_text())["rejected"] == s.rejected
    [rec] = read_metadata(out)
    assert rec.text == "a professional portrait, good.jpg"
    assert sorted(p.name for p in (out / "images").iterdir()) == [rec.path.name]
    # every rejection names the row it came from (file:line)
    for line in (out / "rejected.jsonl").read_text().splitlines():
        assert json.loads(line)["where"].startswith(f"{listing}:")


def _side_by_side(raw: Path) -> Image.Image:
    a = open_image(raw / "images" / "collins-full.jpg")
    b = open_image(raw / "images" / "hopper-full.jpg")
    out = Image.new("RGB", (a.width + b.width, a.height))
    out.paste(a, (0, 0))
    out.paste(b, (a.width, 0))
    return out


def test_face_policies_are_configurable(raw: Path, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    (src / "noface.jpg").write_bytes(
        jpeg(Image.linear_gradient("L").convert("RGB").resize((256, 256)))
    )
    (src / "noface.txt").write_text("an empty studio")
    (src / "two.jpg").write_bytes(jpeg(_side_by_side(raw)))
    (src / "two.txt").write_text("two colleagues")
    cfg = PrepareConfig(**CFG, no_face="center", multiple_faces="largest")
    s = prepare(src, tmp_path / "out", cfg, progress=False)
    assert s.accepted == 2 and s.rejected == {}
    with pytest.raises(DataError, match=r"rejected\.jsonl"):
        prepare(src, tmp_path / "out2", PrepareConfig(**CFG), progress=False)


def test_rerun_skips_done_rows_and_prunes_dropped_ones(raw: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = PrepareConfig(**CFG)
    first = prepare(raw, out, cfg, progress=False)
    assert (first.accepted, first.reused) == (8, 0)
    meta = out / "metadata.jsonl"
    before = {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    second = prepare(raw, out, cfg, progress=False)
    assert (second.accepted, second.reused) == (8, 8)
    assert before == {p.name: p.stat().st_mtime_ns for p in (out / "images").iterdir()}
    # a source with one photo fewer: its crop goes away
    rows = [json.loads(x) for x in (raw / "metadata.jsonl").read_text().splitlines()]
    listing = write_jsonl(
        tmp_path / "fewer.jsonl",
        [{"path": str(raw / r["file_name"]), "text": r["text"]} for r in rows[1:]],
    )
    third = prepare(listing, out, cfg, progress=False)
    assert third.accepted == 7
    assert len(list((out / "images").iterdir())) == 7
    assert len(meta.read_text().splitlines()) == 7


def test_csv_source_and_header_errors(raw: Path, tmp_path: Path) -> None:
    csv_path = tmp_path / "list.csv"
    csv_path.write_text(
        'url,caption\n"' + str(raw / "images" / "hopper-full.jpg") + '","a portrait, navy"\n',
        encoding="utf-8",
    )
    s = prepare(csv_path, tmp_path / "out", PrepareConfig(**CFG), progress=False)
    assert s.accepted == 1
    bad = tmp_path / "bad.csv"
    bad.write_text("picture,words\nx.jpg,hello\n")
    with pytest.raises(DataError, match=rf"{bad}:1: the header needs"):
        prepare(bad, tmp_path / "out2", PrepareConfig(**CFG), progress=False)


def test_cli_prepare_prints_counts(
    raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cvgen.cli import main

    rc = main(
        [
            "data",
            "prepare",
            "--src",
            str(raw),
            "--out",
            str(tmp_path / "o"),
            "--resolution",
            "64",
            "--min-size",
            "64",
            "--no-progress",
        ]
    )
    assert rc == 0
    assert "8 of 8 photos kept" in capsys.readouterr().out
    rc = main(
        ["data", "prepare", "--src", str(tmp_path / "nope.csv"), "--out", str(tmp_path / "o")]
    )
    assert rc == 2
    assert "nope.csv: no such file" in capsys.readouterr().err


# --- HTTP: a local server on 127.0.0.1 --------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    def log_message(self, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        srv = self.server
        srv.hits[self.path] = srv.hits.get(self.path, 0) + 1  # type: ignore[attr-defined]
        route = self.path.split("?")[0]
        if route == "/hang":  # never answers (until the test ends)
            srv.stop.wait(10)  # type: ignore[attr-defined]
            return
        if route == "/flaky" and srv.hits[self.path] == 1:  # type: ignore[attr-defined]
            self.send_response(503)
            self.end_headers()
            return
        if route in srv.redirects:  # type: ignore[attr-defined]
            self.send_response(302)
            self.send_header("Location", srv.redirects[route])  # type: ignore[attr-defined]
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        if route in ("/photo.jpg", "/flaky"):
            self._send(200, "image/jpeg", srv.photo)  # type: ignore[attr-defined]
        elif route == "/page.html":
            self._send(200, "text/html", b"<html>not a photo</html>")
        elif route == "/fake.jpg":
            self._send(200, "image/jpeg", b"<html>an error page served as a jpeg</html>")
        elif route == "/huge.jpg":
            self._send(200, "image/jpeg", srv.photo * 8)  # type: ignore[attr-defined]
        else:
            self._send(404, "text/plain", b"not found")

    def _send(self, code: int, ctype: str, body: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@contextlib.contextmanager
def serving(host: str, photo: bytes) -> Iterator[ThreadingHTTPServer]:
    """A photo server on ``host`` (a loopback address) that counts requests per path."""
    srv = ThreadingHTTPServer((host, 0), _Handler)
    srv.daemon_threads = True
    srv.hits = {}  # type: ignore[attr-defined]
    srv.stop = threading.Event()  # type: ignore[attr-defined]
    srv.photo = photo  # type: ignore[attr-defined]
    srv.redirects = {}  # type: ignore[attr-defined]
    t = threading.Thread(target=srv.serve_forever, daemon=True)
    t.start()
    try:
        yield srv
    finally:
        srv.stop.set()  # type: ignore[attr-defined]
        srv.shutdown()
        srv.server_close()


@pytest.fixture()
def server(portrait: bytes) -> Iterator[ThreadingHTTPServer]:
    with serving("127.0.0.1", portrait) as srv:
        yield srv


def test_urls_failures_are_reported_and_never_stop_the_others(
    server: ThreadingHTTPServer, tmp_path: Path
) -> None:
    base = f"http://127.0.0.1:{server.server_address[1]}"
    names = ["photo.jpg", "missing.jpg", "hang", "page.html", "fake.jpg", "huge.jpg", "flaky"]
    listing = write_jsonl(
        tmp_path / "urls.jsonl", [{"url": f"{base}/{n}", "caption": f"portrait {n}"} for n in names]
    )
    size = len(server.photo)  # type: ignore[attr-defined]
    http = fast_http(read_timeout=0.5, retries=1, max_bytes=size * 4)
    cfg = PrepareConfig(**CFG, http=http, near_duplicate_bits=0)
    s = prepare(listing, tmp_path / "out", cfg, progress=False)
    got = reasons(tmp_path / "out")
    assert got == {
        "missing.jpg": "http_404",
        "hang": "timeout",
        "page.html": "bad_content_type",
        "fake.jpg": "not_an_image",
        "huge.jpg": "too_large",
        "flaky": "duplicate",  # served after one 503 retry: the same photo as photo.jpg
    }
    assert s.accepted == 1
    hits = server.hits  # type: ignore[attr-defined]
    assert hits["/missing.jpg"] == 1  # a 404 is final: no retry
    assert hits["/hang"] == 2  # a timeout is retried (retries=1), then given up
    assert hits["/flaky"] == 2  # a 503 is retried and the second answer is used
    [rec] = read_metadata(tmp_path / "out")
    assert rec.text == "portrait photo.jpg"


def test_prepare_refuses_non_public_addresses_unless_allowed(
    server: ThreadingHTTPServer, raw: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Loopback, private and metadata addresses are refused, for the URL and for each redirect,
    unless ``--allow-network`` names their network (SSRF)."""
    from cvgen.cli import main

    other_photo = (raw / "images" / "collins-full.jpg").read_bytes()
    with serving("127.0.0.2", other_photo) as other:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        server.redirects.update(  # type: ignore[attr-defined]
            {
                "/to-other-loopback": f"http://127.0.0.2:{other.server_address[1]}/photo.jpg",
                "/to-metadata": "http://169.254.169.254/latest/meta-data/",
            }
        )
        names = ["photo.jpg", "to-other-loopback", "to-metadata"]
        listing = write_jsonl(
            tmp_path / "urls.jsonl",
            [{"url": f"{base}/{n}", "caption": f"a portrait, {n}"} for n in names],
        )

        def run(out: str, *allow: str) -> int:
            flags = [x for net in allow for x in ("--allow-network", net)]
            args = ["data", "prepare", "--src", str(listing), "--out", str(tmp_path / out)]
            return main([*args, "--resolution", "64", "--min-size", "64", "--no-progress", *flags])

        # nothing allowed: every row refused before any connection
        assert run("none") == 2
        assert "no photo passed" in capsys.readouterr().err
        assert reasons(tmp_path / "none") == dict.fromkeys(names, "blocked_address")
        assert server.hits == {} and other.hits == {}  # type: ignore[attr-defined]
        detail = json.loads((tmp_path / "none" / "rejected.jsonl").read_text().splitlines()[0])
        assert "127.0.0.1" in detail["detail"] and "--allow-network" in detail["detail"]

        # the first host allowed, but not the addresses its redirects point to
        assert run("host", "127.0.0.1/32") == 0
        assert reasons(tmp_path / "host") == {
            "to-other-loopback": "blocked_address",
            "to-metadata": "blocked_address",
        }
        assert other.hits == {}  # type: ignore[attr-defined]
        rejected = (tmp_path / "host" / "rejected.jsonl").read_text()
        assert "redirects to http://127.0.0.2:" in rejected and "(169.254.169.254)" in rejected

        # the whole loopback range: the redirect is followed; metadata stays refused
        assert run("range", "127.0.0.0/8") == 0
        assert reasons(tmp_path / "range") == {"to-metadata": "blocked_address"}
        assert other.hits == {"/photo.jpg": 1}  # type: ignore[attr-defined]
        assert len(read_metadata(tmp_path / "range")) == 2


def test_allow_network_must_be_a_network(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from cvgen.cli import main

    args = ["data", "prepare", "--src", str(tmp_path), "--out", str(tmp_path / "o")]
    with pytest.raises(SystemExit) as e:
        main([*args, "--allow-network", "10.0.0.0/33"])
    assert e.value.code == 2
    assert "--allow-network: '10.0.0.0/33' is not an IP network" in capsys.readouterr().err
    with pytest.raises(DataError, match="allow_networks: 'intranet' is not an IP network"):
        HttpConfig(allow_networks=("intranet",))
