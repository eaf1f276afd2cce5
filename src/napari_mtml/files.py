"""The file-system boundary: text files read with clear errors, OS errors said in one line.

Every place that reads a settings or log file, or reports an operating-system error to a user
(the `mtml` command, the napari widgets), goes through these, so that the message always names
the path and says what is wrong with it:

```python
from napari_mtml.files import read_text, os_error_message, check_output_file
text = read_text("run.toml", what="config file")   # ValueError naming the file on any problem
os_error_message(exc)        # "out/run: a file is in the way, not a folder"  (one line)
check_output_file(path)      # ValueError when an existing path there is a folder, pipe, ...
check_output_folder(path)    # ValueError when a file is where the folder (or a parent) must be
write_atomic(path, text)     # the old file or the whole new one, never a torn one
```
Only regular files are ever opened: a named pipe (FIFO) would block the read or write forever.
"""

from __future__ import annotations

import errno
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

__all__ = [
    "check_output_file",
    "check_output_folder",
    "not_a_regular_file",
    "os_error_message",
    "read_text",
    "safe_name",
    "write_atomic",
]

_REASONS = {
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder, not a file",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.ENOSPC: "no space left on the device",
    errno.EROFS: "the file system is read-only",
    errno.ENAMETOOLONG: "the name is too long",
    errno.ELOOP: "too many levels of symbolic links",
    errno.EMFILE: "too many open files",
    errno.EDQUOT: "disk quota exceeded",
}


def _file_in_the_way(path: Path) -> Path | None:
    """The first existing non-folder among `path`'s parents (what makes ENOTDIR)."""
    for parent in reversed(path.parents):
        if parent.exists() and not parent.is_dir():
            return parent
    return None


def os_error_message(exc: OSError) -> str:
    """One line naming the path of an `OSError` and what is wrong with it (no traceback).

    `FileExistsError` from creating a folder where a file is, `NotADirectoryError` from a path
    that runs through a file, `IsADirectoryError`, permissions, a full disk... each says which
    path and why; an error without a path keeps the system's text.

    Parameters
    ----------
    exc : OSError

    Returns
    -------
    str
        One line.
    """
    name = exc.filename
    reason = _REASONS.get(exc.errno or -1) or exc.strerror or str(exc) or type(exc).__name__
    if name is None:
        return " ".join(str(exc).split()) or reason
    path = Path(os.fsdecode(name))
    if exc.errno == errno.EEXIST:
        reason = (
            "exists and is not a folder (a folder is needed here)"
            if path.exists() and not path.is_dir()
            else "already exists"
        )
    elif exc.errno == errno.ENOTDIR:
        blocker = _file_in_the_way(path)
        reason = f"{blocker} is a file, not a folder" if blocker is not None else "is not a folder"
    text = f"{path}: {reason}"
    if exc.filename2 is not None:
        text += f" (while moving it to {os.fsdecode(exc.filename2)})"
    return text


def not_a_regular_file(path: str | os.PathLike, what: str = "file") -> str | None:
    """Why `path` cannot be opened as a `what`, as a message naming it: missing, a folder, or
    not a regular file (a named pipe, socket or device: reading a pipe would block forever);
    None for a regular file (links resolved). Can raise `OSError` (e.g. a name too long).

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        The word for it in the message ("file", "config file", ...).

    Returns
    -------
    str or None

    Examples
    --------
    >>> print(not_a_regular_file("/no/such/run.toml", "config file"))
    /no/such/run.toml: config file not found; check the path
    """
    p = Path(path)
    if not p.exists():
        return f"{p}: {what} not found; check the path"
    if p.is_dir():
        return f"{p}: is a folder, not a {what}"
    if not p.is_file():
        return f"{p}: not a regular file (a named pipe, socket or device); give the {what} itself"
    return None


def read_text(path: str | os.PathLike, what: str = "file") -> str:
    """The UTF-8 text of a regular file (a leading byte-order mark is dropped).

    Parameters
    ----------
    path : str or os.PathLike
    what : str
        The word for it in the messages.

    Returns
    -------
    str

    Raises
    ------
    ValueError
        Naming the file: missing, a folder, not a regular file (pipe, socket, device: never
        opened), unreadable, or not UTF-8 text (with the offset of the first bad byte).
    """
    p = Path(path)
    try:
        problem = not_a_regular_file(p, what)
        if problem:
            raise ValueError(problem)
        data = p.read_bytes()
    except OSError as exc:  # a name too long, a folder we may not enter...
        raise ValueError(os_error_message(exc)) from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{p}: not a UTF-8 text {what} (byte 0x{data[exc.start]:02x} at offset {exc.start} "
            "cannot be decoded); save it as UTF-8 text"
        ) from None


def check_output_file(path: str | os.PathLike, what: str = "output file") -> Path:
    """`path` as a Path, refused (ValueError) when something other than a regular file is there.

    Writing onto a named pipe blocks until someone reads it, and onto a folder fails late with an
    OS error; both are said up front, naming the path.

    Parameters
    ----------
    path : str or os.PathLike
        Where the file will be written; it may exist (a regular file is replaced).
    what : str
        What the messages call it ("output file", "metrics file", ...).

    Returns
    -------
    Path
        `path`, checked.

    Raises
    ------
    ValueError
        A folder, a pipe or another non-regular file is at `path`, or a parent is a file.
    """
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"{p}: is a folder; give a file name for the {what}")
    if p.exists() and not p.is_file():
        raise ValueError(
            f"{p}: not a regular file (a named pipe, socket or device); give a "
            f"plain file name for the {what}"
        )
    blocker = _file_in_the_way(p)
    if blocker is not None:
        raise ValueError(f"{p}: {blocker} is a file, not a folder")
    return p


def check_output_folder(path: str | os.PathLike, what: str = "output folder") -> Path:
    """`path` as a Path, refused (ValueError) when it, or one of its parents, exists as a file.

    Checked before long work starts, so that a run does not read all its data and then fail on
    creating its folder.

    Parameters
    ----------
    path : str or os.PathLike
        The folder; it need not exist yet.
    what : str
        Its name in the message.

    Raises
    ------
    ValueError
        `path` or a parent exists as a file.

    Returns
    -------
    Path
    """
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise ValueError(f"{p}: exists and is not a folder; give a folder for the {what}")
    blocker = _file_in_the_way(p)
    if blocker is not None:
        raise ValueError(f"{p}: {blocker} is a file, not a folder; give a folder for the {what}")
    return p


def safe_name(name: str, default: str = "layer") -> str:
    """`name` as a file name: characters other than letters, digits, "-", "_" and "." become
    "_", leading and trailing dots and underscores go (no hidden files); `default` if nothing is
    left. E.g. a napari layer's name for the file it is written to.

    Parameters
    ----------
    name : str
    default : str
        What an empty result becomes.

    Returns
    -------
    str

    Examples
    --------
    >>> safe_name("T1 (axial)"), safe_name("..."), safe_name("a/b.nii")
    ('T1__axial', 'layer', 'a_b.nii')
    """
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(name)).strip("._")
    return safe or default


def write_atomic(
    path: str | os.PathLike,
    content: str | bytes | Callable[[BinaryIO], None],
    *,
    durable: bool = False,
) -> Path:
    r"""Write a file so that readers (and a crash) see the old file or the whole new one.

    The content goes to a temporary file beside `path` (named after it, this process and this
    thread, so concurrent writers of one file never share it), which then replaces `path` with
    `os.replace` (atomic on POSIX and Windows). On any error, or an interruption (Ctrl-C, a
    closed generator), the temporary file is removed and the old file is kept.

    Parameters
    ----------
    path : str or os.PathLike
        The file to write.
    content : str, bytes or callable
        UTF-8 text, bytes, or `write(binary_file)` that writes the content itself (e.g.
        `lambda fh: torch.save(obj, fh)`).
    durable : bool
        Also flush the data to the disk (`os.fsync`) before the replace, so that it survives
        a power failure (checkpoints).

    Returns
    -------
    Path
        `path`.

    Examples
    --------
    >>> import tempfile
    >>> folder = Path(tempfile.mkdtemp())
    >>> write_atomic(folder / "scores.csv", "name,score\n").read_text()
    'name,score\n'
    """
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as fh:
            if callable(content):
                content(fh)
            else:
                fh.write(content.encode("utf-8") if isinstance(content, str) else content)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path
