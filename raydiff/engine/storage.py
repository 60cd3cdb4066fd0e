"""Run storage: where every durable artefact of a run lives, on any node, through `pyarrow.fs`.

`Storage(uri)` takes a local path (made absolute on the driver) or anything
`pyarrow.fs.FileSystem.from_uri` takes, query options included:

    /mnt/shared/runs/tiny                                    local disk / NFS mount
    s3://bucket/runs/tiny?endpoint_override=127.0.0.1:9000&scheme=http   S3-compatible server
    gs://bucket/runs/tiny

Credentials come from the filesystem's standard environment (AWS_ACCESS_KEY_ID, ...).
Paths inside a storage are '/'-joined keys relative to its root. Object stores have
no rename and no append, so: a file is written whole in one `write_bytes`/`upload`;
a set of files (a checkpoint) is complete when its manifest, written last, lists them
(`raydiff.engine.checkpoint`). Node-local disk is scratch only (`scratch_dir`).
A Storage pickles as its URI, so it can travel to any Ray worker.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pyarrow.fs as pafs

_CHUNK = 8 << 20


def is_uri(path: str) -> bool:
    return "://" in str(path)


def join_uri(uri: str, *parts: str) -> str:
    """`uri`/parts, keeping a URI's query options (endpoint_override, scheme, ...) at the end."""
    rel = "/".join(p.strip("/") for p in parts if p and p.strip("/"))
    if not rel:
        return str(uri)
    if not is_uri(uri):
        return str(Path(uri) / rel)
    s = urlsplit(str(uri))
    return urlunsplit((s.scheme, s.netloc, s.path.rstrip("/") + "/" + rel, s.query, s.fragment))


def redact(uri: str) -> str:
    """The URI without its query options (they may hold credentials) for messages."""
    return urlunsplit(urlsplit(uri)._replace(query="")) if is_uri(uri) else str(uri)


class StorageError(RuntimeError):
    pass


class Storage:
    """A root directory on some filesystem; methods take paths relative to it."""

    def __init__(self, uri: str | Path):
        uri = str(uri)
        if not is_uri(uri):
            uri = os.path.abspath(os.path.expanduser(uri))
            self.fs, self.root = pafs.LocalFileSystem(), uri
        else:
            try:
                self.fs, self.root = pafs.FileSystem.from_uri(uri)
            except Exception as e:  # unknown scheme, malformed options
                raise StorageError(f"output.storage={redact(uri)!r}: pyarrow.fs cannot open it ({e}); use a local "
                                   "path or a URI such as s3://bucket/prefix?endpoint_override=HOST:PORT&scheme=http") from e
            self.root = self.root.rstrip("/")
        self.uri = uri

    def __reduce__(self):
        return (Storage, (self.uri,))

    def __repr__(self) -> str:
        return f"Storage({redact(self.uri)!r})"

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, pafs.LocalFileSystem)

    def path(self, rel: str = "") -> str:
        """The filesystem path of `rel` (for pyarrow calls and Ray Train's storage_path)."""
        return self.root + ("/" + rel.strip("/") if rel.strip("/") else "")

    def locate(self, rel: str = "") -> Path | str:
        """What to show a user or hand to local tools: a Path on local storage, else the full URI."""
        return Path(self.path(rel)) if self.is_local else join_uri(self.uri, rel)

    def child(self, rel: str) -> "Storage":
        return Storage(join_uri(self.uri, rel))

    # --- files -------------------------------------------------------------
    def _parent_dirs(self, rel: str) -> None:
        if self.is_local:
            os.makedirs(os.path.dirname(self.path(rel)), exist_ok=True)

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Write one whole file (an object store publishes it at close, never half-written)."""
        self._parent_dirs(rel)
        if self.is_local:  # local disk: write beside, then rename, so readers never see half a file
            tmp = self.path(rel) + f".tmp-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, self.path(rel))
            return
        with self.fs.open_output_stream(self.path(rel)) as f:
            f.write(data)

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type != pafs.FileType.NotFound

    def sizes(self, rel: str = "") -> dict[str, int]:
        """{path relative to `rel`: size} of every file under `rel` (recursive); {} if absent."""
        base = self.path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return {}
        return {i.path[len(base):].lstrip("/"): i.size for i in infos if i.type == pafs.FileType.File}

    def list(self, rel: str = "") -> list[str]:
        """Names directly under `rel` (files and folders), sorted; [] if absent."""
        base = self.path(rel)
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(base, recursive=False, allow_not_found=True))
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(i.path[len(base):].strip("/") for i in infos)

    def delete(self, rel: str) -> None:
        """Remove a file or a folder tree; absent is fine."""
        info = self.fs.get_file_info(self.path(rel))
        if info.type == pafs.FileType.Directory:
            self.fs.delete_dir(self.path(rel))
        elif info.type == pafs.FileType.File:
            self.fs.delete_file(self.path(rel))

    # --- folders -----------------------------------------------------------
    def upload_file(self, local: str | Path, rel: str) -> dict:
        """Copy one local file to `rel`, hashing it on the way: {size, sha256}."""
        self._parent_dirs(rel)
        h, size = hashlib.sha256(), 0
        target = self.path(rel) + (f".tmp-{uuid.uuid4().hex[:8]}" if self.is_local else "")
        with open(local, "rb") as src, self.fs.open_output_stream(target) as dst:
            while chunk := src.read(_CHUNK):
                h.update(chunk)
                size += len(chunk)
                dst.write(chunk)
        if self.is_local:
            os.replace(target, self.path(rel))
        return {"size": size, "sha256": h.hexdigest()}

    def upload_dir(self, local: str | Path, rel: str) -> dict[str, dict]:
        """Copy every file under `local` to `rel/...`; returns {rel/file: {size, sha256}} for a manifest."""
        out = {}
        local = Path(local)
        for f in sorted(p for p in local.rglob("*") if p.is_file()):
            key = f"{rel.strip('/')}/{f.relative_to(local).as_posix()}".lstrip("/")
            out[key] = self.upload_file(f, key)
        return out

    def download_dir(self, rel: str, local: str | Path) -> Path:
        """Copy every file under `rel` into `local` (created); returns `local`."""
        local = Path(local)
        files = self.sizes(rel)
        if not files:
            raise StorageError(f"{redact(join_uri(self.uri, rel))}: nothing there to download")
        for name in files:
            dst = local / name
            dst.parent.mkdir(parents=True, exist_ok=True)
            with self.fs.open_input_stream(self.path(f"{rel}/{name}")) as src, open(dst, "wb") as out:
                while chunk := src.read(_CHUNK):
                    out.write(chunk)
        return local


def run_location(cfg) -> str:
    """The run's storage root: output.storage/<name> when set, else run_dir made absolute (on the driver:
    Ray workers run in other working dirs)."""
    if cfg.output.storage:
        return join_uri(cfg.output.storage if is_uri(cfg.output.storage) else os.path.abspath(cfg.output.storage), cfg.name)
    return os.path.abspath(os.path.expanduser(cfg.run_dir))


def scratch_dir(prefix: str = "raydiff-") -> str:
    """A fresh node-local scratch folder (deleted by the caller via `shutil.rmtree`); never durable."""
    root = os.environ.get("RAYDIFF_SCRATCH") or tempfile.gettempdir()
    os.makedirs(root, exist_ok=True)
    return tempfile.mkdtemp(prefix=prefix, dir=root)


class Scratch:
    """`with Scratch() as d:` a node-local temp folder that is removed afterwards."""

    def __init__(self, prefix: str = "raydiff-"):
        self.prefix = prefix

    def __enter__(self) -> Path:
        self.dir = scratch_dir(self.prefix)
        return Path(self.dir)

    def __exit__(self, *exc) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


PROBE_DIR = ".probe"


def write_probe(storage: Storage) -> str:
    """The driver's half of the reachability probe: a file every role must be able to read."""
    name = f"{PROBE_DIR}/{uuid.uuid4().hex}"
    storage.write_bytes(name, b"raydiff storage probe")
    return name


def read_probe(uri: str, name: str) -> str:
    """A role's half: read the driver's probe file from this node; '' if fine, else why not."""
    try:
        data = Storage(uri).read_bytes(name)
    except Exception as e:
        return f"{type(e).__name__}: {e}"
    return "" if data == b"raydiff storage probe" else "probe file has other contents"


def check_reachable(storage: Storage, readers: dict) -> None:
    """Fail at start, naming the role, unless every reader sees the driver's probe file.

    `readers` maps a role name to a callable(uri, probe_name) -> list of `read_probe` answers,
    run on that role's processes (every learner rank, every rollout worker).
    """
    name = write_probe(storage)
    try:
        problems = [f"{role}: {err}" for role, fn in readers.items() for err in fn(storage.uri, name) if err]
    finally:
        try:
            storage.delete(name)
        except Exception:
            pass
    if problems:
        raise StorageError(
            f"output.storage {redact(storage.uri)!r} is not reachable from every node ({'; '.join(problems)}). "
            "Node-local paths differ per node: set output.storage to shared storage (an NFS mount on every node, "
            "or s3://bucket/prefix / gs://bucket/prefix with credentials in the environment of every node).")
