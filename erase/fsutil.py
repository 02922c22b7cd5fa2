"""Writing files and folders so that nothing is lost and nothing is half-written.

Every artifact erase writes (patches, LoRA exports, pipeline folders, evaluation outputs, the Shapes world's
weights) goes through this module:

- the data is written under a temporary name that is unique per process and call (``tempfile``), in the same folder
  as the final path, so that the final rename is atomic and never crosses a file system;
- the final path is published atomically: a file by ``os.replace`` (overwrite) or ``os.link`` (create only, so two
  runs racing for one name cannot both succeed), a folder by ``os.rename`` (which refuses a non-empty folder);
  what exists is decided at that moment, not only when a command starts;
- on any failure, ``KeyboardInterrupt`` included (and SIGTERM, which the command line turns into one, see
  `sigterm_as_interrupt`), the temporary file or folder is removed and whatever was at the final path before is left
  as it was;
- temporary names say whose they are (``.NAME.erase-TARGET-HOST-PID-RANDOM.tmp``), so that the temporaries of a run
  killed outright (SIGKILL, power loss) are removed by the next run that writes the same target, once their writer
  process is gone; nothing else is ever removed;
- only regular files and folders are ever replaced: a device, FIFO or socket at the output path is refused, also when
  it appears while the data is being written (``/dev/null`` stays a device);
- files and folders get the modes the user's umask gives (``tempfile`` and safetensors create them 0600);
- I/O errors (also safetensors' ``SafetensorError`` wrapping one) become one-line `OutputError` messages that name
  the path and the fix.

Standard library only, so that the leaf modules (``erase.patch``) can use it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import tempfile
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

_FIXES = {
    errno.ENOSPC: "the disk is full: free some space or write elsewhere",
    errno.EDQUOT: "the disk quota is used up: free some space or write elsewhere",
    errno.EFBIG: "the file is larger than this file system (or a file-size limit) allows: write elsewhere",
    errno.EACCES: "no permission to write there: choose a folder you can write to",
    errno.EPERM: "no permission to write there: choose a folder you can write to",
    errno.EROFS: "the file system is read-only: choose a writable folder",
    errno.ENOTDIR: "a part of the path is a file, not a folder: choose another path",
    errno.ENOENT: "the folder does not exist: create it first",
    errno.EISDIR: "it is a folder: pass a file name",
}
# Errors of os.link that mean "this file system has no hard links", not "the name exists".
_NO_HARD_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK, errno.ENOSYS}


class OutputError(OSError):
    """An output that cannot be written, or that would replace what it must not. The message is one line."""

    def __init__(self, message: str, code: int | None = None):
        super().__init__(message)
        self.errno = code

    def __str__(self) -> str:
        return self.args[0]


class OutputExistsError(OutputError, FileExistsError):
    """The output path exists (possibly created by another run while this one was working)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised like Ctrl-C's `KeyboardInterrupt` so that every writer cleans up the same way."""


def _where(path: Path, label: str | None) -> str:
    return f"{label} {path}" if label else str(path)


def _special(path: Path) -> str | None:
    """What ``path`` is when it exists but is neither a regular file nor a folder (symbolic links followed)."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
        return None
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def _special_error(path: Path, label: str | None, what: str, expected: str = "a regular file") -> OutputError:
    return OutputError(
        f"{_where(path, label)} is {what}, not {expected}; erase never replaces one: choose another path", errno.EEXIST
    )


def _not_a_folder(path: Path, label: str | None) -> OutputError:
    what = _special(path)
    if what is not None:
        return _special_error(path, label, what, "a folder")
    return OutputError(f"{_where(path, label)} is a file, not a folder; choose a folder", errno.ENOTDIR)


_PSEUDO_FS = "that folder does not accept new files (a pseudo file system such as /proc?): choose another folder"


def output_error(
    err: BaseException, path: str | os.PathLike, label: str | None = None, reword: bool = False
) -> OutputError | None:
    """The one-line `OutputError` for an I/O failure while writing ``path``; ``None`` if ``err`` is no I/O error.

    Besides `OSError`, this recognises errors that carry an OS error code only in their text, as safetensors'
    ``SafetensorError`` does (``"... No space left on device (os error 28)"``). An `OutputError` is returned as is,
    unless ``reword`` asks for one that names ``path`` (for example the output folder rather than a file in it).
    """
    if isinstance(err, OutputError) and (not reword or err.errno is None):
        return err
    if isinstance(err, OSError) and err.errno is not None:
        code = err.errno
    else:
        found = re.search(r"os error (\d+)", str(err))
        if found is None:
            return None
        code = int(found.group(1))
    fix = _FIXES.get(code, "check the path and the disk")
    if code == errno.ENOENT and Path(path).parent.is_dir():  # /proc and similar refuse new names this way
        fix = _PSEUDO_FS
    return OutputError(f"cannot write {_where(Path(path), label)} ({os.strerror(code)}); {fix}", code)


# ----------------------------------------------------------------------------------------------------------------
# Modes


def umask() -> int:
    """The process umask (read without changing it where ``/proc`` allows)."""
    with contextlib.suppress(OSError):
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    current = os.umask(0o022)  # no /proc: the classic read-by-setting, restored at once
    os.umask(current)
    return current


def apply_umask(path: str | os.PathLike) -> None:
    """Give ``path`` (and, for a folder, everything in it) the modes a plain ``open``/``mkdir`` would have given."""
    mask = umask()
    path = Path(path)
    if path.is_dir():
        for root, dirs, files in os.walk(path):
            for name in dirs:
                os.chmod(os.path.join(root, name), 0o777 & ~mask)
            for name in files:
                os.chmod(os.path.join(root, name), 0o666 & ~mask)
        os.chmod(path, 0o777 & ~mask)
    else:
        os.chmod(path, 0o666 & ~mask)


# ----------------------------------------------------------------------------------------------------------------
# Checks before any heavy work


def _as_path(path: object, label: str | None) -> Path:
    """``path`` as a `Path`; a value that is no path (``None``, a number) is one line, not a ``TypeError``."""
    if not isinstance(path, (str, os.PathLike)):
        raise OutputError(f"{label or 'output'}: expected a file or folder path, got {path!r}")
    return Path(path)


def _nearest_existing(path: Path) -> Path:
    for parent in path.parents:
        if parent.exists() or parent == parent.parent:
            return parent
    return Path(".")


def check_parent(path: str | os.PathLike, label: str | None = None, create: bool = False) -> Path:
    """Check that ``path`` can be created: its folder exists (or, with ``create``, can be made) and is writable.

    Writability is probed by creating and removing a uniquely named empty file, which also catches read-only mounts
    and pseudo file systems (``/proc``) that permission bits do not show.
    """
    path = _as_path(path, label)
    if not str(path) or str(path) == ".":
        raise OutputError(f"{label or 'output'}: empty path; pass a file or folder name")
    parent = path.parent
    if not parent.is_dir():
        existing = _nearest_existing(path)
        if existing.exists() and not existing.is_dir():
            raise OutputError(
                f"cannot write {_where(path, label)}: {existing} is a file, not a folder; choose another path",
                errno.ENOTDIR,
            )
        if not create:
            raise OutputError(f"{_where(path, label)}: folder {parent} does not exist; create it first", errno.ENOENT)
        parent = existing
    _probe(parent, path, label)
    return path


def _probe(folder: Path, path: Path, label: str | None) -> None:
    """Create and remove a uniquely named empty file in ``folder``; a failure names ``path`` and the fix."""
    try:
        fd, probe = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as err:
        fix = _PSEUDO_FS if err.errno == errno.ENOENT else _FIXES.get(err.errno, "check the path and the disk")
        raise OutputError(
            f"cannot write {_where(path, label)}: cannot create files in {folder} ({err.strerror}); {fix}", err.errno
        ) from None


def check_output_file(
    path: str | os.PathLike,
    overwrite: bool,
    label: str | None = None,
    may_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Refuse, before any work, an output file that cannot be written, that exists without ``overwrite``, or that
    is no regular file (a device, FIFO or socket: never replaced); with ``overwrite``, ``may_replace(path)`` raises
    if the existing file must not be replaced."""
    if isinstance(path, str) and not path.strip():  # Path("") would be ".", "a folder"
        raise OutputError(f"{label or 'output'}: empty path; pass a file name")
    path = _as_path(path, label)
    if path.is_dir():
        raise OutputError(f"{_where(path, label)} is a folder; pass a file name", errno.EISDIR)
    what = _special(path)
    if what is not None:
        raise _special_error(path, label, what)
    check_parent(path, label)
    if path.exists() and not overwrite:
        raise OutputExistsError(
            f"{_where(path, label)} already exists; choose a new file or pass --overwrite (overwrite=True)",
            errno.EEXIST,
        )
    if path.exists() and may_replace is not None:
        may_replace(path)
    return path


def check_output_folder(
    path: str | os.PathLike,
    overwrite: bool,
    label: str | None = None,
    may_replace: Callable[[Path], None] | None = None,
    create_parents: bool = False,
) -> Path:
    """Refuse, before any work, an output folder that cannot be written, or that is not empty without
    ``overwrite``; with ``overwrite``, ``may_replace(path)`` raises if the existing folder must not be replaced."""
    path = _as_path(path, label)
    if path.exists() and not path.is_dir():
        raise _not_a_folder(path, label)
    check_parent(path, label, create=create_parents)
    if path.is_dir():
        _probe(path, path, label)  # commands that write into an existing folder need it writable too
    if path.is_dir() and any(path.iterdir()):
        if not overwrite:
            raise OutputExistsError(
                f"{_where(path, label)} is not empty; choose a new folder or pass --overwrite (overwrite=True)",
                errno.ENOTEMPTY,
            )
        if may_replace is not None:
            may_replace(path)
    return path


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.expanduser().resolve() == b.expanduser().resolve()
    except (OSError, RuntimeError):
        return False


def check_differs(path: str | os.PathLike, inputs: dict[str, str | os.PathLike | None], label: str = "--out") -> None:
    """Refuse an output ``path`` that is one of the ``inputs`` (flag -> path; ``None`` skipped): with ``--overwrite``
    it would replace the very file the run reads."""
    for flag, value in inputs.items():
        if value and str(value).strip() and _same_file(Path(path), Path(value)):
            raise OutputError(f"{label} must differ from {flag}; choose another path", errno.EEXIST)


def is_erase_patch(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a regular file whose safetensors header carries ``erase.format_version`` (an erase patch,
    valid or not). Reads the header only."""
    import json
    import struct

    path = Path(path)
    try:
        if not stat.S_ISREG(os.stat(path).st_mode):
            return False
        with path.open("rb") as handle:
            (length,) = struct.unpack("<Q", handle.read(8))
            if length > min(100_000_000, os.fstat(handle.fileno()).st_size - 8):
                return False
            header = json.loads(handle.read(length).decode("utf-8"))
    except (OSError, ValueError, struct.error):
        return False
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    return isinstance(meta, dict) and "erase.format_version" in meta


def files_under(folder: Path) -> list[str]:
    """Every file (and link) under ``folder``, as sorted ``/``-separated relative paths."""
    out = []
    for root, dirs, files in os.walk(folder):
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for name in files + links:
            out.append(Path(root, name).relative_to(folder).as_posix())
    return sorted(out)


def check_written_by(folder: Path, marker: str, writer: str, what: str = "a folder") -> None:
    """Raise `OutputError` unless ``folder`` holds ``marker`` (the JSON file ``writer`` leaves, whose ``"files"``
    lists what it wrote) and no file it does not list: ``overwrite=True`` never deletes a user's folder or files."""
    try:
        listed = json.loads((folder / marker).read_text(encoding="utf-8"))["files"]
        listed = {str(name) for name in listed}
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputError(
            f"{folder}: not {what} written by {writer} (no valid {marker}); refusing to replace it: choose a new or "
            "empty folder, or delete it yourself"
        ) from None
    foreign = [name for name in files_under(folder) if name not in listed and name != marker]
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise OutputError(
            f"{folder}: holds files {writer} did not write ({shown}); refusing to replace it: move them, or choose "
            "a new folder"
        )


def only_erase_patches(label: str | None = None, flag: str = "--overwrite") -> Callable[[Path], None]:
    """A ``may_replace`` check that refuses any existing file but an erase patch (``--resume`` may replace the patch
    an earlier run of the same training wrote, never a user's other file)."""

    def check(path: Path) -> None:
        if os.path.lexists(path) and not is_erase_patch(path):
            raise OutputExistsError(
                f"{_where(path, label)} exists and is not an erase patch; refusing to replace it: choose a new file, "
                f"or pass {flag} to replace it",
                errno.EEXIST,
            )

    return check


# ----------------------------------------------------------------------------------------------------------------
# Writing


_DEFERRED = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def deferred_interrupt() -> Iterator[None]:
    """Hold back Ctrl-C (SIGINT) and SIGTERM for the few renames that must happen together; they act right after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    received: list[int] = []
    previous = {signum: signal.signal(signum, lambda signum, frame: received.append(signum)) for signum in _DEFERRED}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        for signum in dict.fromkeys(received):
            handler = previous[signum]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                os.kill(os.getpid(), signum)  # the default action (SIGTERM: end the process), now that it is safe


def _raise_terminated(signum, frame) -> None:
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises `Terminated` (a `KeyboardInterrupt`), so that it is handled as Ctrl-C
    is: temporary files removed, earlier outputs left as they were. The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------------------------------------------
# Temporary names: ours, per target, and removable once their writer is gone

_TEMP_NAME = re.compile(
    r"\.(?P<name>.*)\.erase-(?P<target>[0-9a-f]{8})-(?P<host>[0-9a-f]{8})-(?P<pid>[0-9]{1,10})-[A-Za-z0-9_]+"
    r"(?P<suffix>\.tmp|\.probe|\.old)",
    re.DOTALL,
)
_NAME_CHARS = 64  # of the target's name kept in a temporary name (the target hash tells targets apart)


def _hash8(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def _host() -> str:
    return _hash8(os.uname().nodename if hasattr(os, "uname") else os.environ.get("COMPUTERNAME", ""))


def _temp_prefix(path: Path) -> str:
    """The start of every temporary name for the final path ``path``: the name (shortened), a hash of the whole name,
    this machine and this process."""
    return f".{path.name[:_NAME_CHARS]}.erase-{_hash8(path.name)}-{_host()}-{os.getpid()}-"


def _alive(pid: int) -> bool:
    if pid == os.getpid() or os.name == "nt":  # Windows: os.kill(pid, 0) would end the process, not probe it
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True  # another user's process, or nothing we can tell: keep its files
    return True


# Folders this process has looked through for stale temporaries: folder -> {target hash: [names]}. A folder is read
# once per process (a writer found dead stays dead), so that writing many files into one folder stays linear.
_STALE: dict[str, dict[str, list[str]]] = {}
_STALE_LOCK = threading.Lock()


def _stale_in(folder: Path) -> dict[str, list[str]]:
    key = os.path.abspath(folder)
    with _STALE_LOCK:
        index = _STALE.get(key)
        if index is None:
            index, host = {}, _host()
            try:
                with os.scandir(folder) as entries:
                    names = [entry.name for entry in entries if ".erase-" in entry.name]
            except OSError:
                names = []
            for name in names:
                found = _TEMP_NAME.fullmatch(name)
                if found is not None and found["host"] == host and not _alive(int(found["pid"])):
                    index.setdefault(found["target"], []).append(name)
            _STALE[key] = index
        return index


def remove_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files and folders that earlier writers of ``path`` left when they were killed outright
    (SIGKILL, power loss): those named for ``path`` by this module, made on this machine, by a process that no
    longer runs (found when this process first writes into that folder). A previous output set aside while a folder
    was being replaced (``.old``) is removed only when ``path`` exists again (the replacement finished); otherwise it
    is kept and a warning says where it is. Returns the paths removed."""
    import logging

    path = Path(path)
    index, target = _stale_in(path.parent), _hash8(path.name)
    with _STALE_LOCK:
        names = index.pop(target, [])
    removed, kept = [], []
    for name in names:
        stale = path.parent / name
        found = _TEMP_NAME.fullmatch(name)
        if found["name"] != path.name[:_NAME_CHARS]:  # another target whose name hashes alike
            kept.append(name)
            continue
        if found["suffix"] == ".old" and not os.path.lexists(path):
            logging.getLogger("erase").warning(
                f"{stale} holds the previous {path} (a run was killed while replacing it): rename it back or delete it"
            )
            kept.append(name)
            continue
        try:
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale)
            else:
                stale.unlink()
        except FileNotFoundError:
            continue
        except OSError:
            kept.append(name)
            continue
        removed.append(stale)
    if kept:
        with _STALE_LOCK:
            index.setdefault(target, []).extend(kept)
    return removed


def _temp_file(path: Path, label: str | None) -> Path:
    remove_stale_temporaries(path)
    try:
        fd, name = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise output_error(err, path, label) from None
    os.close(fd)
    return Path(name)


def _exists_error(path: Path, label: str | None) -> OutputExistsError:
    return OutputExistsError(
        f"{_where(path, label)} already exists (another run may have written it meanwhile); nothing was replaced: "
        "choose a new name or pass --overwrite (overwrite=True)",
        errno.EEXIST,
    )


def _publish_file(
    tmp: Path, path: Path, overwrite: bool, label: str | None, may_replace: Callable[[Path], None] | None = None
) -> None:
    if path.is_dir():
        raise OutputError(f"{_where(path, label)} is a folder; pass a file name", errno.EISDIR)
    what = _special(path)  # decided again now: a FIFO made while the data was written is not replaced either
    if what is not None:
        raise _special_error(path, label, what)
    if overwrite:
        if may_replace is not None and os.path.lexists(path):
            may_replace(path)
        os.replace(tmp, path)
        return
    try:
        os.link(tmp, path)  # atomic create-only: fails if the name exists, whoever made it
    except FileExistsError:
        raise _exists_error(path, label) from None
    except OSError as err:
        if err.errno not in _NO_HARD_LINKS:
            raise
        try:  # no hard links here: reserve the name exclusively, then move the data onto the reservation
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise _exists_error(path, label) from None
        os.replace(tmp, path)


def write_file(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    overwrite: bool = True,
    label: str | None = None,
    may_replace: Callable[[Path], None] | None = None,
) -> Path:
    """Write a file atomically: ``write(tmp)`` fills a uniquely named temporary file next to ``path``, which then
    becomes ``path`` (replacing an existing file only with ``overwrite``). On any failure, the temporary file is
    removed and ``path`` is left as it was. Returns ``path``.

    Args:
        path (`str` or `os.PathLike`): the final file.
        write (`Callable[[Path], object]`): writes the whole content to the path it is given.
        overwrite (`bool`, *optional*, defaults to `True`): replace an existing file; without it an existing file,
            even one created while ``write`` ran, is an `OutputExistsError`.
        label (`str`, *optional*): the command-line flag naming the path in messages (e.g. ``"--out"``).
        may_replace (`Callable[[Path], None]`, *optional*): with ``overwrite``, raises `OutputError` if the file
            found at ``path`` when the data is complete must not be replaced.

    Whatever ``overwrite`` says, only a regular file is ever replaced (never a device, FIFO or socket).
    """
    path = _as_path(path, label)
    if not path.parent.is_dir():
        raise OutputError(f"{_where(path, label)}: folder {path.parent} does not exist; create it first", errno.ENOENT)
    tmp = _temp_file(path, label)
    try:
        write(tmp)
        apply_umask(tmp)
        _publish_file(tmp, path, overwrite, label, may_replace)
    except Exception as err:
        converted = output_error(err, path, label)
        if converted is None or converted is err:
            raise
        raise converted from None
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_bytes(path: str | os.PathLike, data: bytes, overwrite: bool = True, label: str | None = None) -> Path:
    """`write_file` for bytes already in memory."""
    return write_file(path, lambda tmp: tmp.write_bytes(data), overwrite=overwrite, label=label)


def temp_folder(beside: str | os.PathLike, label: str | None = None, suffix: str = ".tmp") -> Path:
    """A new, uniquely named, hidden folder next to ``beside`` (for staging an output before publishing it); the
    stale temporaries of earlier, killed writers of ``beside`` are removed first (`remove_stale_temporaries`)."""
    beside = Path(beside)
    if suffix == ".tmp":
        remove_stale_temporaries(beside)
    try:
        return Path(tempfile.mkdtemp(prefix=_temp_prefix(beside), suffix=suffix, dir=beside.parent))
    except OSError as err:
        raise output_error(err, beside, label) from None


def remove_tree(path: Path) -> None:
    """Remove a staging folder this process made (it is never a user's folder)."""
    shutil.rmtree(path, ignore_errors=True)


def write_folder(
    path: str | os.PathLike,
    write: Callable[[Path], object],
    overwrite: bool = False,
    may_replace: Callable[[Path], None] | None = None,
    label: str | None = None,
) -> Path:
    """Write a folder atomically: ``write(tmp)`` fills a uniquely named temporary folder next to ``path``, which is
    then renamed to ``path``. An empty existing folder is replaced; a non-empty one only with ``overwrite``, and then
    only if ``may_replace(path)`` (checked at that moment) does not raise. The replaced folder is deleted. On any
    failure the temporary folder is removed and ``path`` is left as it was. Returns ``path``.

    Args:
        path (`str` or `os.PathLike`): the final folder.
        write (`Callable[[Path], object]`): writes everything into the (existing, empty) folder it is given.
        overwrite (`bool`, *optional*, defaults to `False`): allow replacing a non-empty folder.
        may_replace (`Callable[[Path], None]`, *optional*): raises `OutputError` if an existing folder must not be
            replaced (for example because this program did not write it).
        label (`str`, *optional*): the command-line flag naming the path in messages.
    """
    path = _as_path(path, label)
    if path.exists() and not path.is_dir():
        raise _not_a_folder(path, label)
    if not path.parent.is_dir():
        raise OutputError(f"{_where(path, label)}: folder {path.parent} does not exist; create it first", errno.ENOENT)
    tmp = temp_folder(path, label)
    try:
        write(tmp)
        apply_umask(tmp)
        _publish_folder(tmp, path, overwrite, may_replace, label)
    except Exception as err:
        converted = output_error(err, path, label)
        if converted is None or converted is err:
            raise
        raise converted from None
    finally:
        remove_tree(tmp)
    return path


def _publish_folder(
    tmp: Path, path: Path, overwrite: bool, may_replace: Callable[[Path], None] | None, label: str | None
) -> None:
    try:
        os.rename(tmp, path)  # atomic; succeeds only if path is absent or an empty folder
        return
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise
    if not path.is_dir():
        raise _not_a_folder(path, label)
    if not overwrite:
        raise _exists_error(path, label)
    if may_replace is not None:
        may_replace(path)
    old = temp_folder(path, label, suffix=".old")  # an empty, uniquely named folder the old output is renamed onto
    with deferred_interrupt():
        os.rename(path, old)
        try:
            os.rename(tmp, path)
        except OSError:
            os.rename(old, path)  # put the previous output back before reporting
            raise
    remove_tree(old)
