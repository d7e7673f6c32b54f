"""Durable writes: the one module that renames, locks, syncs or hashes files.

Every file the toolkit writes that someone relies on later (checkpoints, exports, the latent
cache, sample folders, configs, statistics, sweep tables, PNGs) is written through here, so each
inherits the same guarantees:

* **Atomic**: a file or a folder is built under a temporary name in its own folder and renamed
  into place (:func:`write_file`, :func:`write_folder`); a crash, a kill or a full disk leaves the
  old version or none, never half of one. Temporary files have random names and are created
  exclusively; a temporary folder's fixed name is cleared first: a link planted under either is
  never written through.
* **Checked**: a folder's manifest (:func:`manifest`) lists every file with its size and digest
  (:func:`digest_file`: XXH3-128 over blocks hashed in parallel);
  :func:`manifest_problem` finds a missing, truncated or (``deep``) changed file.
* **One writer**: :class:`Lock` is an OS lock (``flock``) that the kernel drops when its process
  dies, so a killed run never leaves a stale lock.
* **One line on failure**: :func:`write_or_fail` turns a failed write (a full disk, a read-only
  folder) into a :class:`modules.errors.OutputError` that says what failed and what was kept.
* **Folders keep their roles**: :func:`claim_output` takes an output folder for one kind of output
  (a training run, a sample folder, a sweep, a latent store) under a lock and marks it
  (:data:`OUTPUT_MARKER`); a folder claimed for another kind, a model folder, or a folder holding
  files of its own is refused, and data scans skip marked folders (:func:`is_output_folder`), so
  an output written inside a data folder never becomes training data.

Imports only the standard library, xxhash and safetensors' error type; usable from every layer.
"""
from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Union

import xxhash
from safetensors import SafetensorError

from modules.errors import OutputError

# A write that fails (disk full, quota, read-only or vanished folder) surfaces as OSError from
# Python, RuntimeError from torch.save and SafetensorError from safetensors.
WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)
HASH_BLOCK = 1 << 22
DIGEST_BLOCK = 64 << 20      # a file's digest hashes these blocks in parallel
_hash_pool: Optional[ThreadPoolExecutor] = None
Content = Union[str, bytes, Callable[[Path], Any]]


# ----------------------------------------------------------------------------- hashing

def sha256_file(path: Union[str, Path]) -> str:
    """The SHA-256 of a file's content: the identity of a file a user vouches for (a TorchScript network, a text
    encoder's files), and the digest that earlier manifests hold."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(HASH_BLOCK), b""):
            h.update(block)
    return h.hexdigest()


def digest_file(path: Union[str, Path]) -> str:
    """A file's content digest for manifests and exports, to find damage (a flipped bit, a truncated or
    replaced file): ``xxh3:`` and the XXH3-128 of the XXH3-128 of each 64 MiB block, the blocks hashed on
    several threads (xxhash releases the GIL), so that checking a file costs about what reading it does
    (benchmarks/bench_checkpoint.py). SHA-256 (:func:`sha256_file`) stays for identities and for files a
    user vouches for, where a forgery matters; a checkpoint's manifest lies beside what it lists, so a
    forger would rewrite both whatever the hash."""
    global _hash_pool
    if _hash_pool is None:
        _hash_pool = ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1)))
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        fd = f.fileno()

        def block(i: int) -> bytes:
            h, offset, end = xxhash.xxh3_128(), i * DIGEST_BLOCK, min(size, (i + 1) * DIGEST_BLOCK)
            buffer = bytearray(min(HASH_BLOCK, max(1, end - offset)))
            while offset < end:
                n = os.preadv(fd, [memoryview(buffer)[:min(HASH_BLOCK, end - offset)]], offset)
                if not n:
                    break
                h.update(memoryview(buffer)[:n])
                offset += n
            return h.digest()
        digests = list(_hash_pool.map(block, range(max(1, -(-size // DIGEST_BLOCK)))))
    return "xxh3:" + xxhash.xxh3_128(b"".join(digests)).hexdigest()


def digest_matches(path: Union[str, Path], recorded: str) -> bool:
    """Whether a file's content is what a manifest recorded: a :func:`digest_file` digest, or the plain
    SHA-256 that earlier manifests and exports hold."""
    return (digest_file(path) if recorded.startswith("xxh3:") else sha256_file(path)) == recorded


def recorded_digest(entry: Any) -> Optional[str]:
    """The content digest a manifest entry or an export's record holds: ``digest``, or an earlier
    version's ``sha256``; None when there is none."""
    if not isinstance(entry, dict):
        return None
    value = entry.get("digest", entry.get("sha256"))
    return value if isinstance(value, str) else None


def fingerprint(value: Any) -> str:
    """The SHA-256 of a JSON value written canonically (sorted keys): the identity of anything derived
    from the inputs ``value`` names."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


# ----------------------------------------------------------------------------- failures

def write_failure(e: BaseException) -> str:
    """What went wrong with a write, for a one-line message."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return f"{type(e).__name__}: {e}; is the disk full?"


@contextlib.contextmanager
def failed_write_is(what: str, kept: str) -> Iterator[None]:
    """Within it, a failed write is an OutputError saying ``what`` failed and what is ``kept``."""
    try:
        yield
    except WRITE_ERRORS as e:
        raise OutputError(f"could not write {what} ({write_failure(e)}); {kept}") from None


def write_or_fail(write: Callable[[], Any], what: str, kept: str) -> Any:
    """Run ``write``; a failed write is an OutputError saying ``what`` failed and what is ``kept``."""
    with failed_write_is(what, kept):
        return write()


# ----------------------------------------------------------------------------- files and folders

def sync_file(path: Path) -> None:
    """Force a file's (or a folder's) data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_file(path: Union[str, Path], content: Content, sync: bool = False) -> Path:
    """Write ``path`` atomically. ``content`` is text, bytes, or a function that writes the file at the
    path it is given (``lambda tmp: image.save(tmp)``). ``sync``: the data reaches the disk before the
    rename (what a manifest lists must survive a power cut)."""
    path = Path(path)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    tmp = Path(name)
    try:
        with os.fdopen(fd, "wb") as f:
            if isinstance(content, (str, bytes)):
                f.write(content.encode() if isinstance(content, str) else content)
        if callable(content):
            content(tmp)
        if sync:
            sync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def link_or_copy(source: Path, target: Path) -> None:
    """``target`` holds ``source``'s bytes: a hard link where the file system allows (no second copy on disk),
    else a copy."""
    Path(target).parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(source, target)
    except OSError:     # another file system, or one without hard links
        shutil.copyfile(source, target)


def write_json(path: Union[str, Path], value: Any, sync: bool = False) -> Path:
    return write_file(path, json.dumps(value, indent=1) + "\n", sync)


def clear(path: Path) -> None:
    """Remove whatever is at ``path``: a link (never what it points to), a file or a folder."""
    if path.is_symlink() or path.is_file():
        path.unlink()
    elif path.exists():
        shutil.rmtree(path)


def fresh_folder(path: Union[str, Path]) -> Path:
    """An empty folder at ``path``, created exclusively (whatever was there, a planted link included, is
    removed first, and a link is never followed)."""
    path = Path(path)
    clear(path)
    path.mkdir(parents=False)
    return path


def publish_folder(tmp: Path, folder: Path, sync: bool = False) -> Path:
    """Put the finished folder ``tmp`` in place of ``folder``: an existing ``folder`` is moved aside to
    ``NAME.old``, ``tmp`` renamed in, and the old one removed. A kill between the two renames leaves
    the old version aside, which :func:`recover_folder` puts back. ``sync``: every file and the
    parent folder reach the disk first."""
    if sync:
        for path in tmp.rglob("*"):
            if path.is_file():
                sync_file(path)
    if folder.exists() or folder.is_symlink():
        old = fresh_folder(folder.with_name(folder.name + ".old"))
        os.replace(folder, old)
        os.replace(tmp, folder)
        clear(old)
    else:
        os.replace(tmp, folder)
    if sync:
        sync_file(folder.parent)
    return folder


def write_folder(folder: Union[str, Path], write: Callable[[Path], Any], sync: bool = False) -> Path:
    """Build a folder with ``write(tmp)`` in ``NAME.tmp`` beside ``folder``, then :func:`publish_folder` it.
    A failed write leaves ``folder`` as it was and no ``NAME.tmp``."""
    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = fresh_folder(folder.with_name(folder.name + ".tmp"))
    try:
        write(tmp)
        publish_folder(tmp, folder, sync)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return folder


def recover_folder(folder: Union[str, Path]) -> None:
    """Undo what a kill inside :func:`write_folder` left: the previous version back in place when the
    new one never arrived, and no ``NAME.tmp`` / ``NAME.old`` leftovers."""
    folder = Path(folder)
    tmp, old = (folder.with_name(folder.name + suffix) for suffix in (".tmp", ".old"))
    if not folder.exists() and old.is_dir() and not old.is_symlink() and any(old.iterdir()):
        os.replace(old, folder)
    for leftover in (tmp, old):
        clear(leftover)


# ----------------------------------------------------------------------------- manifests

def file_entry(path: Path) -> dict[str, Any]:
    """A manifest's entry for one file: its size and content digest (:func:`digest_file`)."""
    return {"size": path.stat().st_size, "digest": digest_file(path)}


def manifest(folder: Path, exclude: tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """Every file under ``folder`` (relative name -> size and digest), but those named in ``exclude``."""
    return {str(p.relative_to(folder)): file_entry(p)
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name not in exclude}


def manifest_problem(folder: Path, files: Any, deep: bool = False, exact: bool = False,
                     exclude: tuple[str, ...] = ()) -> Optional[str]:
    """Why ``folder`` does not hold what the manifest ``files`` lists, or None. Sizes are always checked;
    ``deep`` reads every file for its digest too; ``exact``: a file the manifest does not list (but those
    named in ``exclude``) is a problem too. A manifest that is not a mapping of names to entries with a
    size is itself the problem (a damaged manifest never raises)."""
    if not isinstance(files, dict):
        return f"the manifest's file list is {type(files).__name__}, not a mapping of names"
    for name, entry in files.items():
        size = entry.get("size") if isinstance(entry, dict) else entry
        if not isinstance(name, str) or not isinstance(size, int) or isinstance(size, bool):
            return f"the manifest's entry for {name!r} has no size"
        path = folder / name
        if Path(os.path.normpath(name)).is_absolute() or os.path.normpath(name).startswith(".."):
            return f"the manifest names {name!r}, outside the folder"
        if not path.is_file():
            return f"missing file {name}"
        if path.stat().st_size != size:
            return f"file {name} has {path.stat().st_size} bytes, expected {size} (truncated?)"
    if exact:
        extra = [p.name for p in folder.rglob("*") if p.is_file() and p.name not in exclude
                 and str(p.relative_to(folder)) not in files]
        if extra:
            return f"unexpected file {sorted(extra)[0]}"
    if deep:
        for name, entry in files.items():
            expected = recorded_digest(entry)
            if expected is not None and not digest_matches(folder / name, expected):
                return f"file {name} changed since it was written (its checksum differs: damaged or replaced)"
    return None


def read_json(path: Path) -> Any:
    """A JSON file's value, or raises ValueError with the reason (unreadable, not UTF-8, invalid JSON)."""
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise ValueError("not a UTF-8 text file") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"invalid JSON ({e})") from None
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except OSError as e:
        raise ValueError(f"cannot be read ({e.strerror or e})") from None


# ----------------------------------------------------------------------------- locks and output folders

class Lock:
    """An exclusive OS lock on the file ``path``, held from :meth:`acquire` until :meth:`release` or the
    process's death (the kernel drops it). The file is opened without following a link, and holds
    the holder's pid and host so a refusal can name it."""

    def __init__(self, path: Union[str, Path]):
        self.path = Path(path)
        self.fd: Optional[int] = None

    def acquire(self, wait: bool = False) -> Optional[str]:
        """Take the lock (``wait``: until it is free); returns None, or why it was not taken."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as e:
            if e.errno == errno.ELOOP:
                return f"{self.path} is a link; remove it"
            return f"cannot create the lock file {self.path} ({e.strerror or e})"
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except OSError as e:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                return f"in use by {holder}"
            return f"cannot lock {self.path} ({e.strerror or e})"
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode(), 0)
        except OSError:
            pass    # the record is for messages only; the lock itself is held
        self.fd = fd
        return None

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    @contextlib.contextmanager
    def held(self, wait: bool = True) -> Iterator[None]:
        problem = self.acquire(wait)
        if problem:
            raise OutputError(f"cannot lock {self.path}: {problem}")
        try:
            yield
        finally:
            self.release()


OUTPUT_MARKER = ".ldm-output.json"     # {"kind": ...}: the folder holds this toolkit's output of that kind
OUTPUT_KINDS = ("run", "samples", "sweep", "latent_cache")


def output_kind(folder: Union[str, Path]) -> Optional[str]:
    """The kind of output a folder was claimed for, or None (not an output folder, or an unreadable marker)."""
    try:
        record = read_json(Path(folder) / OUTPUT_MARKER)
    except ValueError:
        return None
    kind = record.get("kind") if isinstance(record, dict) else None
    return kind if kind in OUTPUT_KINDS else None


def is_output_folder(folder: Union[str, Path]) -> bool:
    """Whether ``folder`` holds this toolkit's output (a data scan skips it)."""
    return (Path(folder) / OUTPUT_MARKER).is_file()


def model_folder_kind(folder: Path) -> Optional[str]:
    """What model a folder holds (our export's kind, a diffusers class), or None."""
    try:
        record = read_json(folder / "config.json")
    except ValueError:
        return None
    if not isinstance(record, dict):
        return None
    kind = record.get("kind") or record.get("_class_name")
    return str(kind) if kind else None


def claim_output(folder: Union[str, Path], kind: str, lock_name: str = ".lock") -> Lock:
    """Take ``folder`` for output of ``kind`` (one of :data:`OUTPUT_KINDS`): create it, refuse a model folder
    or a folder claimed for another kind, take its lock (refused while another process holds it) and
    mark it. Returns the held lock; the caller releases it when done. Problems are one-line
    :class:`OutputError`\ s naming the folder."""
    folder = Path(folder)
    try:
        is_link, is_file, is_dir = folder.is_symlink(), folder.is_file(), folder.is_dir()
    except OSError as e:      # a name too long, a folder not searchable: what a user can cause
        raise OutputError(f"output folder {folder}: {e.strerror or e}") from None
    if is_link or is_file:
        raise OutputError(f"output folder {folder} is a {'link' if is_link else 'file'}")
    model = model_folder_kind(folder) if is_dir else None
    if model:
        raise OutputError(f"{folder} is a model folder (config.json of a {model!r}); outputs go elsewhere, and "
                              "the next export would replace it")
    claimed = output_kind(folder) if is_dir else None
    if claimed and claimed != kind:
        raise OutputError(f"{folder} holds a {claimed} output; choose another folder for the {kind} output")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create output folder {folder} ({e.strerror or e})") from None
    lock = Lock(folder / lock_name)
    problem = lock.acquire(wait=False)
    if problem:
        raise OutputError(f"output folder {folder}: {problem}" + ("; wait for it to end or choose another folder"
                                                                      if problem.startswith("in use") else ""))
    try:
        if claimed is None:
            write_json(folder / OUTPUT_MARKER, {"kind": kind})
    except WRITE_ERRORS as e:
        lock.release()
        raise OutputError(f"cannot write to output folder {folder} ({write_failure(e)})") from None
    return lock
