"""Remote videos: fetched once, within the decode deadline and video.max_bytes.

The server below answers the two S3 calls pyarrow's S3FileSystem makes for a read (HeadObject,
then ranged GetObject) for one object, counts the bytes it sends, and can stall mid-body: it
sends the headers and the first bytes, then nothing, like an object store that stops sending.
"""

from __future__ import annotations

import threading
import time
from email.utils import formatdate
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from pyarrow.fs import S3FileSystem

from ovml_core.config import VideoConfig
from ovml_core.video import VideoDecodeError, sample_frames
from tests.videos import write_indexed_video

STALL_AFTER = 512  # bytes sent before a stalling server goes quiet


class FakeS3:
    def __init__(self, body: bytes, stall: bool = False):
        self.body, self.stall = body, stall
        self.sent = 0
        self.release = threading.Event()  # ends a stall (so the test can shut the server down)
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def uri(self, key: str = "clips/clip.mp4") -> str:
        host, port = self.server.server_address
        return f"s3://{key}?endpoint_override={host}:{port}&scheme=http&region=us-east-1"

    def close(self) -> None:
        """End a stall and refuse new connections: the abandoned read of a stalled fetch (and
        its SDK retries) then ends at once instead of waiting on an unanswered socket."""
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    def _handler(self):
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def _headers(self, status: int, length: int, extra: dict | None = None):
                self.send_response(status)
                self.send_header("Content-Length", str(length))
                self.send_header("Last-Modified", formatdate(usegmt=True))
                self.send_header("ETag", '"0123"')
                for key, value in (extra or {}).items():
                    self.send_header(key, value)
                self.end_headers()

            def do_HEAD(self):
                self._headers(200, len(fake.body))

            def do_GET(self):
                start, end = 0, len(fake.body) - 1
                if "Range" in self.headers:
                    first, last = self.headers["Range"].removeprefix("bytes=").split("-")
                    start, end = int(first), min(int(last or end), end)
                part = fake.body[start : end + 1]
                total = len(fake.body)
                self._headers(206, len(part), {"Content-Range": f"bytes {start}-{end}/{total}"})
                if fake.stall:
                    part = part[:STALL_AFTER]
                self.wfile.write(part)
                self.wfile.flush()
                fake.sent += len(part)
                if fake.stall:
                    fake.release.wait(120)

        return Handler


@pytest.fixture
def aws_env(monkeypatch):
    for key, value in {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }.items():
        monkeypatch.setenv(key, value)


def test_a_stalled_read_becomes_an_error_within_the_deadline(tmp_path, aws_env):
    body = write_indexed_video(tmp_path / "clip.mp4", 40, gop=8).read_bytes()
    server = FakeS3(body, stall=True)
    try:
        started = time.monotonic()
        with pytest.raises(VideoDecodeError, match="read stalled.*max_decode_s=2"):
            sample_frames(server.uri(), 4, 32, VideoConfig(max_decode_s=2.0))
        assert time.monotonic() - started < 2.0 + 3.0  # the deadline plus a margin
        assert 0 < server.sent <= STALL_AFTER
    finally:
        server.close()


def test_a_remote_video_is_fetched_once(tmp_path, aws_env):
    path = write_indexed_video(tmp_path / "clip.mp4", 40, gop=8)
    body = path.read_bytes()
    server = FakeS3(body)
    try:
        remote, meta = sample_frames(server.uri(), 4, 32, VideoConfig(mode="seek"))
        local, _ = sample_frames(path, 4, 32, VideoConfig(mode="seek"))
        assert (remote == local).all() and meta["seeks"] == 4
        assert server.sent == len(body)  # two passes and four seeks, one fetch
    finally:
        server.close()


def test_video_max_bytes_caps_remote_and_local_files(tmp_path, aws_env):
    path = write_indexed_video(tmp_path / "clip.mp4", 40, gop=8)
    body = path.read_bytes()
    limits = VideoConfig(max_bytes=len(body) - 1)
    with pytest.raises(VideoDecodeError, match="video.max_bytes"):
        sample_frames(path, 4, 32, limits)
    server = FakeS3(body)
    try:
        with pytest.raises(VideoDecodeError, match="video.max_bytes"):
            sample_frames(server.uri(), 4, 32, limits)
        assert len(sample_frames(server.uri(), 4, 32, VideoConfig(max_bytes=len(body)))[0]) == 4
    finally:
        server.close()


def test_error_rows_say_whether_trying_again_may_help(tmp_path, aws_env):
    """A stalled read is transient (the next run tries again); a file that is not a video, or
    a refused scheme, is permanent (tried again only once the file changes)."""
    from pipeline.decode import decode_video

    body = write_indexed_video(tmp_path / "clip.mp4", 40, gop=8).read_bytes()
    (tmp_path / "notes.mp4").write_text("not a video")
    server = FakeS3(body, stall=True)
    host, port = server.server.server_address
    s3 = S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http", region="us-east-1")
    try:
        rows = {
            uri: decode_video(
                {"video_id": "v", "uri": uri},
                num_frames=4,
                size=32,
                limits=VideoConfig(max_decode_s=1.0),
                allowed_schemes=("file", "s3"),
                filesystems={"s3": s3},  # as the tagging job passes an endpoint override
            )
            for uri in ("s3://clips/clip.mp4", str(tmp_path / "notes.mp4"), "gs://b/clip.mp4")
        }
    finally:
        server.close()
    kinds = [(row["error_kind"], row["error"].split(":")[0]) for row in rows.values()]
    assert kinds == [
        ("transient", "VideoDecodeError"),
        ("permanent", "VideoDecodeError"),
        ("permanent", "ValueError"),
    ]
