"""A type checker sees every config read: options are read through their sections (``cfg.optim.learning_rate``)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CONFIG_ATTRIBUTE = re.compile(r'error: "(\w*Config|Command)" has no attribute')


@pytest.mark.slow
def test_mypy_finds_no_config_attribute_errors(tmp_path):
    pytest.importorskip("mypy")
    run = subprocess.run([sys.executable, "-m", "mypy", "softtokens", "--no-error-summary",
                          "--cache-dir", str(ROOT / ".mypy_cache")], cwd=ROOT, capture_output=True, text=True)
    assert "softtokens" in run.stdout or run.returncode == 0, run.stderr
    wrong = [line for line in run.stdout.splitlines() if CONFIG_ATTRIBUTE.search(line)]
    assert not wrong, "\n".join(wrong)


@pytest.mark.slow
def test_the_check_catches_a_flat_read(tmp_path):
    pytest.importorskip("mypy")
    (tmp_path / "flat.py").write_text("from softtokens.config import TrainConfig\n\n"
                                      "def lr(cfg: TrainConfig) -> float:\n    return cfg.learning_rate\n")
    run = subprocess.run([sys.executable, "-m", "mypy", str(tmp_path / "flat.py"), "--follow-imports=silent",
                          "--no-error-summary", "--cache-dir", str(tmp_path / "cache")], cwd=ROOT,
                         capture_output=True, text=True)
    assert CONFIG_ATTRIBUTE.search(run.stdout), run.stdout + run.stderr
