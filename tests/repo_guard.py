"""Tests read only what the repository carries.

A clone in an empty folder must pass the whole suite, so no test may read a sibling of the checkout (such as
``../shared``). ``GUARD`` is an audit hook (``sys.addaudithook``) on the ``open``, ``os.listdir`` and
``os.scandir`` events of the test process: a path inside the repository's parent folder but outside the
repository is refused with ``OutsideRepositoryReadError`` (a ``PermissionError``) and recorded, and the test that
made the read fails (``check_reads``, called by ``tests/conftest.py`` after each test and at the end of the
session, because some callers swallow the error: ``pathlib.Path.glob`` ignores a ``PermissionError``, and a
thread dies quietly).

Allowed wherever they are: the virtualenv and Python's own prefixes, site-packages, the temp folder (and
pytest's), the user's cache (``$XDG_CACHE_HOME`` or ``~/.cache``, ``$HF_HOME``, ``$TORCH_HOME``), and hidden
entries of the parent folder (``.config``, ``.netrc``, ... when the checkout sits in a home folder). An allowed
folder that holds the parent folder does not allow the siblings: in a clone at ``/tmp/x/main``, ``/tmp/x/shared``
is refused although ``/tmp`` is allowed. Not watched: subprocesses (workers, the test FHIR server), a checkout
whose parent is an allowed folder itself (``/tmp/main``: the temp folder wins), and one beside ``/``.
"""

from __future__ import annotations

import os
import site
import sys
import tempfile
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.realpath(__file__)))
WATCHED_EVENTS = frozenset({"open", "os.listdir", "os.scandir"})


class OutsideRepositoryReadError(PermissionError):
    """A test tried to read a path outside the repository."""


def _inside(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip(os.sep) + os.sep)


class RepoGuard:
    def __init__(self, repo_root: str) -> None:
        self.repo = os.path.realpath(repo_root)
        parent = os.path.dirname(self.repo)
        # Both spellings of the parent, so that a path reached through a symbolic link is still seen.
        self.parents = tuple({parent, os.path.dirname(os.path.abspath(repo_root))})
        self.enabled = os.path.dirname(parent) != parent  # the parent is not the filesystem root
        self.allowed: list[str] = []
        self.reads: list[str] = []  # "event path (during test)", in order
        self.checked = 0  # reads already reported
        home = os.path.expanduser("~")
        cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(home, ".cache")
        for folder in (
            sys.prefix,
            sys.exec_prefix,
            sys.base_prefix,
            sys.base_exec_prefix,
            *site.getsitepackages(),
            site.getusersitepackages(),
            tempfile.gettempdir(),
            cache,
            os.environ.get("HF_HOME"),
            os.environ.get("TORCH_HOME"),
        ):
            if folder:
                self.allow(folder)

    def allow(self, folder: str | os.PathLike[str]) -> None:
        self.allowed.append(os.path.realpath(folder))

    def is_outside(self, path: str) -> bool:
        """True for a path in the repository's parent folder that is neither in the repository nor allowed."""
        absolute = os.path.abspath(path)
        if not any(_inside(absolute, parent) for parent in self.parents):
            return False  # system paths and everything else outside the parent folder
        real = os.path.realpath(absolute)
        if _inside(real, self.repo):
            return False
        for parent in self.parents:
            if _inside(real, parent):
                # Allowed folders count inside the parent folder only: /tmp must not allow /tmp/x/shared.
                if any(_inside(real, folder) and _inside(folder, parent) for folder in self.allowed):
                    return False
                first = os.path.relpath(real, parent).split(os.sep, 1)[0]
                # The parent itself (a listing shows the siblings) is outside; its hidden entries, in a home folder
                # configuration and caches, are not.
                return first == "." or not first.startswith(".")
        return False  # resolved to somewhere outside the parent folder: not a sibling of the checkout

    def hook(self, event: str, args: tuple[Any, ...]) -> None:
        if event not in WATCHED_EVENTS or not self.enabled:
            return
        target = args[0] if args else None
        if target is None:
            target = "."  # os.listdir() / os.scandir(): the current folder
        if isinstance(target, int):
            return  # an open file descriptor
        try:
            path = os.fsdecode(target)
        except TypeError:
            return
        if self.is_outside(path):
            test = os.environ.get("PYTEST_CURRENT_TEST", "outside any test")
            self.reads.append(f"{event} {os.path.abspath(path)} (during {test})")
            raise OutsideRepositoryReadError(
                f"tests read only what the repository carries: {path} is outside {self.repo} "
                "(put what the test needs under tests/fixtures/)"
            )

    def new_reads(self) -> list[str]:
        """The reads not reported yet; they count as reported from now on."""
        reads = self.reads[self.checked :]
        self.checked = len(self.reads)
        return reads


GUARD = RepoGuard(REPO_ROOT)
sys.addaudithook(GUARD.hook)  # audit hooks cannot be removed: one per process, installed once on import


def check_reads() -> None:
    """Fail the running test if a path outside the repository was read since the last check."""
    reads = GUARD.new_reads()
    if reads:
        import pytest

        pytest.fail("read outside the repository:\n  " + "\n  ".join(reads), pytrace=False)
