"""Output paths: check them before any work is done, write through a temporary sibling, rename at the end.

mdref writes three kinds of output: a PNG (`generate -o`), a trace file (`trace -o`, `save_trace`) and a golden
bundle folder (`golden DIR`). All go through this module:

  check_output_path(path, what)   a file path mdref may create or replace; raises OutputError otherwise
  atomic_write(path, write, what) write(tmp) fills a fresh temporary file next to path, then it is renamed onto path
  check_output_dir(path, what)    a folder path mdref may create; raises OutputError otherwise
  atomic_dir(path, fill, what)    fill(tmp) fills a fresh temporary folder next to path, then it is renamed onto path

A file target is refused when the path is empty or names a folder (ends in "/"), when the target exists and is not
a regular file (a folder, a device such as /dev/null, a FIFO, a socket) or is a symbolic link (even one to a regular
file: mdref never replaces a link, nor writes through one), when the parent folder is missing or is not a folder,
when the name is longer than the filesystem allows, or when no file can be created in the parent folder (read-only
filesystem, no permission, /proc). A folder target is refused on the same grounds, and also when it exists and is
not an empty folder (mdref does not mix a new bundle with old files). Any OSError while writing (a full disk,
ENOSPC) removes the temporary file or folder and is reported as "could not write (...)". Nothing is left behind,
also when the write is interrupted (Ctrl-C, or SIGTERM, which the command line turns into an exception). A replaced
file or folder keeps its permission bits (a 0600 output stays 0600); a new one gets the umask's.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

__all__ = ["OutputError", "check_output_path", "atomic_write", "check_output_dir", "atomic_dir"]


class OutputError(ValueError):
    """An output path mdref refuses, or could not write."""


def _reason(e):
    return e.strerror or str(e) or type(e).__name__


def _temp_name(parent):
    return Path(parent) / f".mdref-{os.getpid()}-{os.urandom(4).hex()}.tmp"


def _check_target(path, what, *, folder):
    s = os.fspath(path)
    if not isinstance(s, str):
        s = os.fsdecode(s)
    if s == "":
        raise OutputError(f"{what}: empty path; expected a {'folder' if folder else 'file'} name")
    if "\0" in s:
        raise OutputError(f"{what} {s!r}: the path contains a NUL character")
    p = Path(s)
    if not folder and s.endswith(("/", os.sep)):
        raise OutputError(f"{what} {s}: ends in '/', so it names a folder; expected a file name")
    parent = p.parent
    try:
        parent_is_dir = stat.S_ISDIR(os.stat(parent).st_mode)
    except (FileNotFoundError, NotADirectoryError):
        raise OutputError(f"{what} {s}: no such folder {parent}") from None
    except OSError as e:          # ENAMETOOLONG, EACCES, ELOOP
        raise OutputError(f"{what} {s[:80]}: cannot be used as an output path ({_reason(e)})") from None
    if not parent_is_dir:
        raise OutputError(f"{what} {s}: {parent} is not a folder")
    try:
        name_max = os.pathconf(parent, "PC_NAME_MAX")
    except (OSError, ValueError):
        name_max = 255
    if len(os.fsencode(p.name)) > name_max:
        raise OutputError(f"{what} {s[:60]}...: the name is {len(os.fsencode(p.name))} bytes, longer than the "
                          f"filesystem's limit of {name_max}")
    try:
        st = os.lstat(p)
    except FileNotFoundError:
        st = None
    except OSError as e:          # ENOTDIR (a path under a file), ENAMETOOLONG, EACCES, ELOOP
        raise OutputError(f"{what} {s}: cannot be used as an output path ({_reason(e)})") from None
    if st is not None:
        if stat.S_ISLNK(st.st_mode):
            raise OutputError(f"{what} {s}: is a symbolic link; mdref does not replace or write through links "
                              f"(expected a new path or a regular file)")
        if folder:
            if not stat.S_ISDIR(st.st_mode):
                raise OutputError(f"{what} {s}: exists and is not a folder (expected a new or empty folder)")
            try:
                empty = not any(os.scandir(p))
            except OSError as e:
                raise OutputError(f"{what} {s}: cannot be read ({_reason(e)})") from None
            if not empty:
                raise OutputError(f"{what} {s}: exists and is not empty (expected a new or empty folder; "
                                  f"remove it or choose another)")
        elif not stat.S_ISREG(st.st_mode):
            kind = ("a folder" if stat.S_ISDIR(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                    or stat.S_ISBLK(st.st_mode) else "a FIFO" if stat.S_ISFIFO(st.st_mode)
                    else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
            raise OutputError(f"{what} {s}: exists and is {kind} (expected a new path or a regular file)")
    probe = _temp_name(parent)   # can a file be created next to it at all? (read-only fs, permissions, /proc)
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except OSError as e:
        raise OutputError(f"{what} {s}: cannot create files in {parent} ({_reason(e)})") from None
    os.unlink(probe)
    return p


def _keep_mode(target, tmp):
    """Give tmp the permission bits of the file or folder it is about to replace (if there is one)."""
    try:
        mode = stat.S_IMODE(os.stat(target).st_mode)
    except FileNotFoundError:
        return
    os.chmod(tmp, mode)


def check_output_path(path, what="-o"):
    """The output file path as a Path, or OutputError saying why mdref will not write there."""
    return _check_target(path, what, folder=False)


def check_output_dir(path, what="DIR"):
    """The output folder path as a Path, or OutputError saying why mdref will not create it."""
    return _check_target(path, what, folder=True)


def atomic_write(path, write, what="-o"):
    """Check path, create an empty temporary file next to it, call write(tmp_path) to fill it, rename it onto
    path. On any failure the temporary file is removed; an OSError becomes OutputError ("could not write")."""
    p = check_output_path(path, what)
    tmp = _temp_name(p.parent)
    try:
        os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))   # mode as umask allows
        write(tmp)
        _keep_mode(p, tmp)
        os.replace(tmp, p)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise OutputError(f"{what} {path}: could not write ({_reason(e)})") from None
        raise
    return p


def atomic_dir(path, fill, what="DIR"):
    """Check path, create a temporary folder next to it, call fill(tmp_path), rename it onto path (an existing
    empty folder is replaced). On any failure the temporary folder is removed; an OSError becomes OutputError."""
    p = check_output_dir(path, what)
    tmp = _temp_name(p.parent)
    try:
        os.mkdir(tmp)
        fill(tmp)
        _keep_mode(p, tmp)
        os.replace(tmp, p)     # POSIX: replaces an empty folder, fails (ENOTEMPTY) on a non-empty one
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"{what} {path}: could not write ({_reason(e)})") from None
        if isinstance(e, OutputError):                  # a file inside it (named by its temporary path)
            raise OutputError(f"{what} {path}: could not write ({e})") from None
        raise
    return p
