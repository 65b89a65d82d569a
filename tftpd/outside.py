"""The files the master reads again on SIGHUP, kept in reach across a chroot.

With -s the master chroots into the served root with its workers, and the
configuration file (-C) and the map file (-m) are outside it. Before the chroot the
master opens the directory of each; a reload then opens the file by name relative to
that directory (openat), so an edited or replaced file is read afresh. The directory
descriptors are the master's only, and lead out of the chroot: a worker closes them
first thing, so no process that answers TFTP or HTTP clients holds them (the master
reads the network only for --metrics scrapes). The master has dropped privileges
before a reload, so the files must be readable by the user it runs as.
"""

from __future__ import annotations

import errno
import os
from collections.abc import Callable

Opener = Callable[[str, int], int]  # open()'s opener: (path, flags) -> descriptor


class OutsideFiles:
    """Directory descriptors for files named by path, opened before a chroot."""

    def __init__(self) -> None:
        self._dirs: dict[str, int] = {}  # directory (absolute) -> its descriptor
        self._names: dict[str, tuple[str, str]] = {}  # path as given -> (directory, name)

    def keep(self, path: str | None) -> None:
        """Keep `path`'s directory in reach (call before the chroot)."""
        if not path or path in self._names:
            return
        # Symlinks resolved now: inside the chroot an absolute target would be looked
        # up in the served root. The file itself is then opened without following one.
        directory, name = os.path.split(os.path.realpath(path))
        if directory not in self._dirs:
            try:
                self._dirs[directory] = os.open(directory, os.O_RDONLY | os.O_DIRECTORY
                                                | os.O_CLOEXEC)
            except OSError:
                return  # a reload then says the file cannot be read, as without -s
        self._names[path] = (directory, name)

    def opener(self, path: str, flags: int) -> int:
        """For open(path, opener=...): a kept path through its directory; any other
        is out of reach."""
        kept = self._names.get(path)
        if kept is None:
            raise OSError(errno.ENOENT, "outside the chroot (-s); a new path needs a restart",
                          path)
        directory, name = kept
        return os.open(name, flags | os.O_CLOEXEC | os.O_NOFOLLOW,
                       dir_fd=self._dirs[directory])

    def close(self) -> None:
        for fd in self._dirs.values():
            os.close(fd)
        self._dirs.clear()
        self._names.clear()
