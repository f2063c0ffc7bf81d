"""`batchnorm explain`: the transform step by step on typed numbers; clean one-line errors."""

from __future__ import annotations

import re
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from batchnorm.cli import app

runner = CliRunner()
X_HAT_1_TO_5 = [-1.41, -0.71, 0.0, 0.71, 1.41]  # (x - 3) / sqrt(2 + eps), two decimals


def _table_column(output: str, column: int) -> list[float]:
    """The numbers in one column of the rich table: rows are lines split by the box bar."""
    rows = [line.split("│")[1:-1] for line in output.splitlines() if line.count("│") >= 6]
    return [float(cells[column]) for cells in rows]


def _assert_explains_one_to_five(output: str) -> None:
    assert re.search(r"^\s*mean\b.*=\s*3\s*$", output, re.M), output
    assert re.search(r"^\s*variance\b.*biased.*=\s*2\s*$", output, re.M), output
    assert _table_column(output, 1) == [1, 2, 3, 4, 5]  # x
    assert _table_column(output, 3) == pytest.approx(X_HAT_1_TO_5, abs=1e-9)  # x_hat, as printed
    assert _table_column(output, 4) == pytest.approx(X_HAT_1_TO_5, abs=1e-9)  # y, gamma 1 beta 0
    for text in ("-1.41", "-0.71", "0.71", "1.41"):
        assert text in output


def _assert_one_line_error(code: int, output: str, word: str) -> None:
    assert code != 0
    lines = [line for line in output.splitlines() if line.strip()]
    assert len(lines) == 1, output
    assert "error" in lines[0] and word in lines[0]
    assert "Traceback" not in output


def test_explain_one_to_five():
    result = runner.invoke(app, ["explain", "1", "2", "3", "4", "5"])
    assert result.exit_code == 0, result.output
    _assert_explains_one_to_five(result.output)
    assert re.search(r"running_var\b.*=\s*2\.5\s*$", result.output, re.M)  # unbiased, stored


def test_explain_with_gamma_and_beta():
    result = runner.invoke(app, ["explain", "1", "2", "3", "4", "5", "--gamma", "2", "--beta", "0.5"])
    assert result.exit_code == 0, result.output
    assert _table_column(result.output, 3) == pytest.approx(X_HAT_1_TO_5, abs=1e-9)
    want_y = [2 * (v - 3) / (2 + 1e-5) ** 0.5 + 0.5 for v in (1, 2, 3, 4, 5)]
    assert _table_column(result.output, 4) == pytest.approx(want_y, abs=5e-3)


def test_explain_non_number_is_one_line_error():
    result = runner.invoke(app, ["explain", "1", "two", "3"])
    _assert_one_line_error(result.exit_code, result.output, "two")
    assert result.exception is None or isinstance(result.exception, SystemExit)


def test_explain_single_value_is_one_line_error():
    result = runner.invoke(app, ["explain", "7"])
    _assert_one_line_error(result.exit_code, result.output, "at least 2")


def test_help_lists_explain():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    assert re.search(r"^\W*explain\b", result.output, re.M), result.output


def test_command_in_a_real_process():
    """The installed entry point's module, run as a program: output and exit codes."""
    cmd = [sys.executable, "-m", "batchnorm.cli", "explain"]
    ok = subprocess.run([*cmd, "1", "2", "3", "4", "5"], capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stderr
    _assert_explains_one_to_five(ok.stdout)
    bad = subprocess.run([*cmd, "1", "x", "3"], capture_output=True, text=True, timeout=120)
    _assert_one_line_error(bad.returncode, bad.stdout + bad.stderr, "'x'")
