"""Write errors on the local store (a file-size limit, as a full disk or a quota would): a
clean failure naming the step and the path, nothing committed or left half-written, and the
same command succeeds once space is back."""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest

TESSERA = str(Path(sys.executable).with_name("tessera"))
pytestmark = [
    pytest.mark.slow,
    pytest.mark.fault("fault: disk full"),
]  # two CLI runs rendering the tiny demo corpus


def _limit_file_size(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # write() then fails with EFBIG
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_a_full_disk_fails_cleanly_and_the_rerun_succeeds(tmp_path):
    home = tmp_path / "home"
    env = {**os.environ, "TESSERA_HOME": str(home)}
    cmd = [TESSERA, "demo-data", "-p", "tiny", "--run-id", "full-disk", "--no-track"]
    proc = subprocess.run(
        cmd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        preexec_fn=_limit_file_size(4096),  # the corpus files are larger
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    step_dir = home / "store" / "runs" / "full-disk" / "demo_data"
    assert f"step demo_data: writing its output {step_dir} failed" in proc.stderr
    assert "File too large" in proc.stderr and "Nothing was committed" in proc.stderr
    assert "Traceback" not in proc.stderr
    runs = home / "store" / "runs" / "full-disk"
    assert not step_dir.exists()
    assert not [p for p in runs.iterdir() if ".staging-" in p.name]  # no half-written staging
    again = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert (step_dir / "_SUCCESS").is_file()
