"""The one home for writing files safely: atomic writes, checksummed checkpoints, run directories.

* Atomic writes: every file goes to a temporary file in the same folder and is renamed into place,
  so an interruption leaves the old file or the new one, never half of one.
* Checksums: a checkpoint ``X`` gets ``X.sha256`` beside it (size and SHA-256); a truncated or
  otherwise changed checkpoint is refused on load with "corrupt checkpoint", naming the file.
* Run directories: each stage writes a marker (:data:`MARKER`) saying what kind of directory it
  made. ``--overwrite`` replaces only a directory whose marker names the same kind; a directory
  without a marker (older versions wrote none, and nothing else writes one) is never replaced: the
  user removes it. A replacement is built in a sibling directory and swapped in only when the
  stage has finished, so a failed or interrupted new run leaves the old one as it was.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .layout import CHECKSUM_SUFFIX, MARKER

MARKER_FORMAT = "openmm_cgnn.run_marker/1"
# kind -> the stage that writes it (for messages)
KINDS = {"aa": "aa", "cg": "simulate", "model": "train", "mapping": "map", "export": "export", "report": "evaluate"}


class OutputDirError(ValueError):
    """An output directory cannot be used (wrong kind, not ours, not writable)."""


class CorruptFileError(ValueError):
    """A checkpoint does not match the size and checksum stored beside it."""


# ---- atomic writes -------------------------------------------------------------------------------
@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that wants a file name; renamed to ``path`` on success.

    The temporary name keeps ``path``'s suffix (matplotlib and others choose the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=f".tmp{path.suffix}")
    os.close(handle)
    try:
        yield Path(temporary)
        os.chmod(temporary, 0o644)  # mkstemp makes it 0600; the files are the user's results
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_text(text)
    return Path(path)


def write_json_atomic(path: str | os.PathLike, payload: Any, default: Any = None) -> Path:
    return write_text_atomic(path, json.dumps(payload, indent=2, default=default) + "\n")


def save_figure(fig: Any, path: str | os.PathLike, **savefig_kwargs: Any) -> Path:
    """``fig.savefig`` atomically, then close the figure."""
    import matplotlib.pyplot as plt

    try:
        with atomic_path(path) as temporary:
            fig.savefig(temporary, **savefig_kwargs)
    finally:
        plt.close(fig)
    return Path(path)


# ---- checkpoint checksums ------------------------------------------------------------------------
def _digest(path: Path) -> tuple[str, int]:
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            sha.update(block)
            size += len(block)
    return sha.hexdigest(), size


def checksum_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + CHECKSUM_SUFFIX)


def file_sha256(path: str | os.PathLike) -> str:
    return _digest(Path(path))[0]


def _entry(path: Path) -> dict[str, Any]:
    digest, size = _digest(path)
    return {"size": size, "sha256": digest}


@contextlib.contextmanager
def atomic_checkpoint(path: str | os.PathLike) -> Iterator[Path]:
    """Like :func:`atomic_path`, and records the new file's size and SHA-256 in ``path.sha256``.

    The record is written before the rename and keeps the previous file's entry too, so whichever
    of the two files an interruption leaves in place still verifies.
    """
    path = Path(path)
    with atomic_path(path) as temporary:
        yield temporary
        record = {"file": path.name, **_entry(temporary)}
        previous = _read_record(checksum_path(path)) if path.exists() else None
        if previous is not None:
            record["previous"] = {"size": previous["size"], "sha256": previous["sha256"]}
        write_json_atomic(checksum_path(path), record)


def _read_record(stored_path: Path) -> dict[str, Any] | None:
    try:
        stored = json.loads(stored_path.read_text())
        return {"size": int(stored["size"]), "sha256": str(stored["sha256"]),
                "previous": stored.get("previous") if isinstance(stored.get("previous"), dict) else None}
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise CorruptFileError(f"{stored_path}: unreadable checksum file ({exc})") from None


def verify_checksum(path: str | os.PathLike, required: bool = True) -> None:
    """Raise :class:`CorruptFileError` naming ``path`` unless it matches its stored size and checksum.

    A checkpoint without a checksum file (written by an older version) passes unless ``required``.
    """
    path = Path(path)
    record = _read_record(checksum_path(path))
    if record is None:
        if required:
            raise CorruptFileError(f"{path}: corrupt checkpoint (no {checksum_path(path).name} beside it to verify it)")
        return
    actual = _entry(path)
    accepted = [record] + ([record["previous"]] if record["previous"] else [])
    if not any(actual["size"] == int(e.get("size", -1)) and actual["sha256"] == e.get("sha256") for e in accepted):
        raise CorruptFileError(f"{path}: corrupt checkpoint ({actual['size']} bytes, {record['size']} recorded in "
                               f"{checksum_path(path).name}, checksum differs): truncated or changed since it was written")


# ---- run directories -----------------------------------------------------------------------------
def read_marker(directory: str | os.PathLike) -> str | None:
    """The kind recorded in ``directory``'s marker, or None when it has none (or an unreadable one)."""
    path = Path(directory) / MARKER
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data.get("kind") if isinstance(data, dict) and data.get("format") == MARKER_FORMAT else None


def write_marker(directory: str | os.PathLike, kind: str) -> None:
    from . import __version__

    if kind not in KINDS:
        raise ValueError(f"unknown run directory kind {kind!r}")
    write_json_atomic(Path(directory) / MARKER, {"format": MARKER_FORMAT, "kind": kind, "stage": KINDS[kind],
                                                 "openmm_cgnn": __version__})


def is_empty_dir(directory: str | os.PathLike) -> bool:
    directory = Path(directory)
    return not directory.exists() or not any(directory.iterdir())


def check_writable(directory: str | os.PathLike, flag: str = "--out") -> None:
    """Fail now, not after the compute, when ``directory`` (or its nearest existing parent) is not writable."""
    directory = Path(directory)
    probe = directory
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise OutputDirError(f"{flag} {directory}: {probe} exists and is not a directory")
    try:
        handle, name = tempfile.mkstemp(dir=probe, prefix=".openmm_cgnn_write_test.")
        os.close(handle)
        os.unlink(name)
    except OSError as exc:
        raise OutputDirError(f"{flag} {directory}: cannot write in {probe} ({exc.strerror or exc})") from None


def check_output_dir(out: str | os.PathLike, kind: str, *, overwrite: bool = False, resume: bool = False,
                     flag: str = "--out", resumable: bool | None = None) -> bool:
    """Check before any compute that ``out`` may receive a ``kind`` run; True when it holds one to replace.

    An empty or missing directory is always fine. A non-empty one needs ``--resume`` or
    ``--overwrite`` and, for either, a marker of the same kind; ``--resume`` also accepts an
    unmarked directory (it replaces nothing, and the stage checks its own files). ``resumable``
    (default: by kind) says whether the refusal offers ``--resume``.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise OutputDirError(f"{flag} {out}: exists and is not a directory")
    check_writable(out, flag)
    if is_empty_dir(out):
        return False
    found = read_marker(out)
    stage = KINDS[kind]
    if found is not None and found != kind:
        raise OutputDirError(f"{flag} {out}: holds a {found} directory (written by '{KINDS.get(found, found)}'), "
                             f"where '{stage}' writes only {kind} directories: choose another {flag}")
    if resume:
        return False
    if not overwrite:
        if resumable is None:
            resumable = kind not in UNRESUMABLE_KINDS
        choices = "--resume or --overwrite" if resumable else "--overwrite to replace it"
        raise OutputDirError(f"{flag} {out}: already exists and is not empty; use {choices}")
    if found is None:
        raise OutputDirError(f"{flag} {out}: --overwrite refuses to replace it: only a directory that '{stage}' wrote "
                             f"(with a {MARKER} marker of kind {kind}) is replaced, and this one has none (your own "
                             "files, another stage's, or an older version's output): remove it yourself or choose "
                             f"another {flag}")
    check_writable(out.parent, flag)  # the replacement is built beside it
    return True


def staging_path(out: str | os.PathLike) -> Path:
    out = Path(out).absolute()  # "." has no name to put a sibling beside
    return out.parent / f".{out.name}.partial"


def staging_dir(out: str | os.PathLike) -> Path:
    """The sibling directory a replacement of ``out`` is built in (emptied first)."""
    staging = staging_path(out)
    if staging.exists():
        shutil.rmtree(staging)
    staging.mkdir(parents=True)
    return staging


def swap_in(staging: str | os.PathLike, out: str | os.PathLike) -> None:
    """Rename ``staging`` to ``out``; an existing ``out`` is moved aside first and removed last."""
    staging, out = Path(staging), Path(out).absolute()
    old = None
    if out.exists():
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
    try:
        staging.rename(out)
    except BaseException:
        if old is not None:
            old.rename(out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# Stages that cannot resume always build beside ``out``: an interrupted one then leaves nothing there.
UNRESUMABLE_KINDS = ("mapping", "export", "report")


@contextlib.contextmanager
def output_dir(out: str | os.PathLike, kind: str, replace: bool) -> Iterator[Path]:
    """The directory a stage writes into: ``out`` itself, or a sibling swapped in on success.

    The sibling is used when an old run is replaced (``replace``) and for stages that cannot resume.
    The marker is written first, so even an interrupted run can later be resumed or replaced. On
    failure a sibling is left where it is (its summary says what went wrong) and ``out`` is untouched.
    """
    out = Path(out)
    replace = replace or kind in UNRESUMABLE_KINDS
    target = staging_dir(out) if replace else out
    target.mkdir(parents=True, exist_ok=True)
    write_marker(target, kind)
    yield target
    if replace:
        swap_in(target, out)


def describe_os_error(exc: OSError) -> str:
    """One line naming the path an I/O error happened on."""
    where = exc.filename if exc.filename is not None else "an output file"
    if getattr(exc, "filename2", None):
        where = f"{where} -> {exc.filename2}"
    return f"{where}: {exc.strerror or exc}"
