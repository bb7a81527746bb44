"""The worker's command: the OpenMP wait policy is set before PyTorch loads, and only where nobody set one."""

from __future__ import annotations

import subprocess
import sys

import pytest

from worker.cli import set_thread_wait


def test_the_setting_becomes_omp_wait_policy_unless_the_environment_names_one() -> None:
    environ: dict[str, str] = {}
    assert set_thread_wait("passive", environ, torch_loaded=False) == "passive"
    assert environ == {"OMP_WAIT_POLICY": "PASSIVE"}
    chosen = {"OMP_WAIT_POLICY": "active"}  # an operator's own choice wins
    assert set_thread_wait("passive", chosen, torch_loaded=False) == "active"
    assert chosen == {"OMP_WAIT_POLICY": "active"}


def test_after_pytorch_loaded_the_policy_is_left_alone_and_said_so(caplog: pytest.LogCaptureFixture) -> None:
    environ: dict[str, str] = {}
    with caplog.at_level("WARNING", logger="fhir_ner.worker"):
        assert set_thread_wait("passive", environ, torch_loaded=True) == "unchanged"
    assert environ == {} and "PyTorch was loaded before" in caplog.text


def test_the_command_line_reaches_the_worker_verb_without_loading_pytorch() -> None:
    """OpenMP reads OMP_WAIT_POLICY once, when PyTorch loads: the command's modules must not load it first."""
    probe = "import sys, adapter.cli, worker.cli; print('torch' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
