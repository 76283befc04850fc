"""Which files the board may read and write: typed paths are checked against a few allowed roots.

The board can be reached from other machines (``--host``), so a path typed into the page must not
become a way to read ``/etc/passwd`` or write over ``~/.ssh``: every path is resolved (symlinks
followed) and must lie under the working directory, a ``--data-root`` / ``--output-root`` the user
named, or a read-only model root (the embedded model's cache). ``..`` is refused outright, even when
the result would land inside a root, so that what the page shows is what is used.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path


class PathRefused(ValueError):
    """A typed path that lies outside the board's allowed folders."""


def _under(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


@dataclass
class PathGuard:
    """Resolves typed paths; raises :class:`PathRefused` for anything outside the allowed roots.

    Args:
        workdir: the working directory; relative paths are taken from here.
        data_roots / output_roots: extra folders the user named (read / read-write).
        model_roots: extra read-only folders (model caches).
    """

    workdir: Path
    data_roots: list[Path] = field(default_factory=list)
    output_roots: list[Path] = field(default_factory=list)
    model_roots: list[Path] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.workdir = Path(self.workdir).resolve()
        self.data_roots = [self._root(p) for p in self.data_roots]
        self.output_roots = [self._root(p) for p in self.output_roots]
        self.model_roots = [self._root(p) for p in self.model_roots]

    def _root(self, p: str | os.PathLike) -> Path:
        p = Path(p)
        return (p if p.is_absolute() else self.workdir / p).resolve()

    @property
    def writable(self) -> list[Path]:
        return [self.workdir, *self.output_roots]

    @property
    def readable(self) -> list[Path]:
        return [self.workdir, *self.data_roots, *self.output_roots, *self.model_roots]

    def resolve(self, text: str | os.PathLike, *, write: bool = False, what: str = "path") -> Path:
        """The absolute path for ``text``, if it is allowed.

        Raises:
            PathRefused: empty, contains ``..``, or outside the allowed roots (for ``write``: outside the
                working directory and the output roots).
        """
        raw = str(text).strip()
        if not raw:
            raise PathRefused(f"{what}: empty path")
        if "\0" in raw:
            raise PathRefused(f"{what}: {raw!r}: not a path")
        p = Path(os.path.expanduser(raw)) if raw.startswith("~") else Path(raw)
        if ".." in p.parts:
            raise PathRefused(f"{what}: {raw}: '..' is not allowed in paths typed into the board")
        full = (p if p.is_absolute() else self.workdir / p).resolve()
        roots = self.writable if write else self.readable
        if not any(_under(full, r) for r in roots):
            raise PathRefused(f"{what}: {raw}: outside the folders the board may {'write' if write else 'read'} "
                              f"({', '.join(map(str, roots))})")
        return full

    def show(self, path: str | os.PathLike) -> str:
        """``path`` relative to the working directory when inside it (shorter, and what the CLI takes)."""
        p = Path(path)
        try:
            return str(p.resolve().relative_to(self.workdir))
        except ValueError:
            return str(p)
