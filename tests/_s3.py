"""A real S3-API server on 127.0.0.1 for tests: moto's server mode, one subprocess in its own process group.

    with S3Server() as s3:
        uri = s3.bucket_uri("runs")      # s3://runs?endpoint_override=127.0.0.1:PORT&scheme=http
        env = s3.env                     # AWS_* for every process that reaches it (drivers, Ray nodes)

Stopped by its process group (tests/_private_head.stop_group), never by name.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import urllib.request

from _private_head import free_port, stop_group

CREDS = {"AWS_ACCESS_KEY_ID": "raydiff-test", "AWS_SECRET_ACCESS_KEY": "raydiff-test", "AWS_DEFAULT_REGION": "us-east-1",
         "AWS_EC2_METADATA_DISABLED": "true"}


class S3Server:
    def __init__(self, log_path: str | None = None):
        self.port = free_port()
        self.log_path = log_path or f"/tmp/moto-{os.getpid()}-{self.port}.log"
        self.proc: subprocess.Popen | None = None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        return dict(CREDS)

    def start(self, timeout_s: float = 60) -> "S3Server":
        log = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                                     stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, **CREDS})
        deadline = time.time() + timeout_s
        while True:
            try:
                urllib.request.urlopen(f"http://{self.endpoint}/", timeout=2).read()
                return self
            except Exception:
                if self.proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"moto server did not start: {open(self.log_path).read()[-2000:]}")
                time.sleep(0.3)

    def bucket_uri(self, bucket: str, prefix: str = "") -> str:
        """Create `bucket` (idempotent) and return an s3:// URI reaching it through this server."""
        import pyarrow.fs as pafs

        opts = f"endpoint_override={self.endpoint}&scheme=http"
        saved = {k: os.environ.get(k) for k in CREDS}
        os.environ.update(CREDS)
        try:
            fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}?{opts}&allow_bucket_creation=true")
            fs.create_dir(bucket)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
        path = f"{bucket}/{prefix.strip('/')}" if prefix.strip("/") else bucket
        return f"s3://{path}?{opts}"

    def stop(self) -> None:
        if self.proc is not None:
            stop_group(self.proc)
            self.proc = None

    def __enter__(self) -> "S3Server":
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc) -> None:
        self.stop()
