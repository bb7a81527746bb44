"""The guard of tests/repo_guard.py: a test that reads beside the checkout (``../shared``) fails."""

from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import FIXTURES_DIR, REPO_ROOT
from repo_guard import GUARD, OutsideRepositoryReadError, RepoGuard, check_reads

SIBLING = REPO_ROOT.parent / f"not-this-repository-{uuid.uuid4().hex[:8]}"  # need not exist: refused before the call


def _refused(read: Callable[[], Any]) -> str:
    """Run ``read``, which must be refused and recorded; return the record and take it back (this test passes)."""
    before = len(GUARD.reads)
    with pytest.raises(OutsideRepositoryReadError, match="outside"):
        read()
    assert len(GUARD.reads) == before + 1
    record = GUARD.reads.pop()
    assert os.environ["PYTEST_CURRENT_TEST"].split(" ")[0] in record  # names the test that read
    return record


@pytest.mark.skipif(not GUARD.enabled, reason="the repository's parent is the filesystem root")
@pytest.mark.parametrize(
    "read",
    [
        lambda: open(SIBLING / "data.txt"),  # noqa: SIM115
        lambda: (SIBLING / "data.txt").read_text(),
        lambda: os.listdir(SIBLING),
        lambda: os.scandir(SIBLING),
        lambda: open(os.fsencode(SIBLING / "data.txt"), "rb"),  # noqa: SIM115
        lambda: open(REPO_ROOT / ".." / SIBLING.name / "data.txt"),  # noqa: SIM115
    ],
    ids=["open", "read_text", "listdir", "scandir", "bytes", "dotdot"],
)
def test_a_read_beside_the_checkout_is_refused_and_recorded(read: Callable[[], Any]) -> None:
    assert str(SIBLING) in _refused(read)


@pytest.mark.skipif(not GUARD.enabled, reason="the repository's parent is the filesystem root")
def test_a_relative_path_is_resolved_against_the_working_folder(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO_ROOT)
    assert str(SIBLING) in _refused(lambda: open(Path("..") / SIBLING.name / "notes.txt"))  # noqa: SIM115


@pytest.mark.skipif(not GUARD.enabled, reason="the repository's parent is the filesystem root")
@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the thread below, on purpose
def test_a_swallowed_error_still_fails_the_test() -> None:
    # Code that catches the error (pathlib's glob ignores a PermissionError), and a thread, which dies without
    # failing its test: the record stays.
    with contextlib.suppress(OSError):
        os.listdir(SIBLING)
    thread = threading.Thread(target=lambda: (SIBLING / "x.json").read_text())
    thread.start()
    thread.join()
    assert len(GUARD.new_reads()) == 2  # what the checks after each test phase see...
    with pytest.raises(pytest.fail.Exception, match="read outside the repository"):
        GUARD.reads.append("open /elsewhere (during this test)")
        check_reads()  # ...and how they fail the test


def test_what_a_test_may_read(tmp_path: Path) -> None:
    assert not GUARD.is_outside(str(FIXTURES_DIR / "fhir-examples"))
    assert not GUARD.is_outside(str(REPO_ROOT / "README.md"))
    assert not GUARD.is_outside(str(tmp_path / "anything"))
    assert not GUARD.is_outside(os.path.join(tempfile.gettempdir(), "anything"))
    assert not GUARD.is_outside(os.path.join(sys.prefix, "lib"))
    assert not GUARD.is_outside("/etc/hosts")
    assert not GUARD.is_outside(str(REPO_ROOT.parent / ".cache" / "x"))  # hidden entries (a home folder)
    assert (FIXTURES_DIR / "README.md").read_text()  # no error, nothing recorded


def test_the_decision_for_a_checkout_in_a_home_folder(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "project").mkdir(parents=True)
    guard = RepoGuard(str(home / "project"))
    guard.allowed = []  # as if the temp folder and the caches were elsewhere
    assert guard.is_outside(str(home / "shared" / "data"))
    assert guard.is_outside(str(home / "project" / ".." / "shared"))
    assert guard.is_outside(str(home / "project-other" / "x"))  # a name that starts like the repository's
    assert not guard.is_outside(str(home / "project" / "tests" / "x"))
    assert not guard.is_outside(str(home / ".netrc"))
    assert guard.is_outside(str(home))  # listing the parent shows the siblings
    (home / "project" / "link").symlink_to(home / "shared", target_is_directory=False)
    assert guard.is_outside(str(home / "project" / "link" / "x"))  # a symbolic link out of the repository
    assert not RepoGuard("/checkout").enabled  # beside the filesystem root there is no telling


def test_a_checkout_in_the_temp_folder(tmp_path: Path) -> None:
    clone = tmp_path / "clone" / "main"  # like `git clone ... /tmp/cc/main`
    clone.mkdir(parents=True)
    guard = RepoGuard(str(clone))
    assert _inside_temp(clone)
    assert guard.is_outside(str(tmp_path / "clone" / "shared" / "data"))  # the temp folder allows no sibling
    assert not guard.is_outside(os.path.join(tempfile.gettempdir(), "tmp-file"))  # other temp files are fine
    assert not guard.is_outside(str(clone / "tests"))
    in_temp = RepoGuard(os.path.join(tempfile.gettempdir(), "main"))  # a checkout right in the temp folder:
    assert not in_temp.is_outside(os.path.join(tempfile.gettempdir(), "shared"))  # not watched (documented)


def _inside_temp(path: Path) -> bool:
    return str(path.resolve()).startswith(os.path.realpath(tempfile.gettempdir()) + os.sep)


def test_a_descriptor_and_the_working_folder_are_not_paths() -> None:
    calls: list[tuple[str, tuple[Any, ...]]] = [("open", (3, "r", 0)), ("os.listdir", (None,)), ("exec", ())]
    for event, args in calls:
        GUARD.hook(event, args)  # nothing raised
