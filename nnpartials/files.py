"""Reading and writing the files of a bundle (or a key) defensively: neutral helpers for the loader, the writer and
signatures. A file is read only if it is a regular file (no symbolic links, FIFOs, devices), never past a size
limit; a file is written only if it does not exist yet, and synced to disk."""

from __future__ import annotations

import errno
import os
import stat

from nnpartials.errors import BundleError


def _kind(mode) -> str:
    for test, what in ((stat.S_ISDIR, "a folder"), (stat.S_ISLNK, "a symbolic link"), (stat.S_ISFIFO, "a FIFO"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket")):
        if test(mode):
            return what
    return "not a regular file"


def _read_regular(folder, name, limit: int, missing: str) -> bytes:
    """The bytes of ``folder/name``, which must be a regular file of at most ``limit`` bytes.

    A symbolic link is refused whatever it points to (``O_NOFOLLOW`` where the platform has it, and an ``lstat``
    check everywhere), so is anything that is not a regular file (folder, FIFO, device, socket); the file is
    opened non-blocking (a FIFO cannot hang the open) and never read past ``limit`` bytes (``/dev/zero`` or a
    file that grows cannot fill memory). ``missing``: the message when the file does not exist.
    """
    fpath = os.path.join(folder, name)
    try:
        st = os.lstat(fpath)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        raise BundleError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None
    if not stat.S_ISREG(st.st_mode):
        raise BundleError(f"{fpath}: expected a regular file, found {_kind(st.st_mode)} "
                          f"(bundle files must be plain files inside the bundle folder, not links)")
    flags = os.O_RDONLY
    for flag in ("O_NOFOLLOW", "O_NONBLOCK", "O_BINARY", "O_CLOEXEC"):
        flags |= getattr(os, flag, 0)
    try:
        fd = os.open(fpath, flags)
    except FileNotFoundError:
        raise BundleError(missing) from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise BundleError(f"{fpath}: expected a regular file, found a symbolic link") from None
        raise BundleError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):  # swapped between lstat and open
            raise BundleError(f"{fpath}: expected a regular file, found {_kind(st.st_mode)}")
        if st.st_size > limit:
            raise BundleError(f"{fpath}: {st.st_size} bytes, more than the {limit} allowed")
        chunks, left = [], limit + 1
        while left > 0:
            chunk = os.read(fd, min(left, 1 << 20))
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
    except OSError as exc:
        raise BundleError(f"{fpath}: cannot be read ({exc.strerror or exc})") from None
    finally:
        os.close(fd)
    data = b"".join(chunks)
    if len(data) > limit:
        raise BundleError(f"{fpath}: more than the {limit} bytes allowed (the file grew while it was read)")
    return data


def _write_file(folder, name, data: bytes):
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_BINARY", 0)
    with os.fdopen(os.open(os.path.join(folder, name), flags, 0o666), "wb") as f:  # 0o666 & ~umask
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
