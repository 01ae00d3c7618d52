"""`make test` runs `pytest -n 2 --dist loadgroup`: a module marked `xdist_group` must run on one
worker, so its module-scoped fixtures (a whole pipeline run, a trained step) are built once.

pytest 9.2 moved `Node.nodeid` off the `_nodeid` attribute pytest-xdist 3.8 rewrites to add the
group, and every group was silently split across both workers again (each built its fixtures
twice: the pipeline DAG run cost 503 s + 478 s of one CI). This runs the real plugins on a
generated suite and counts the setups.
"""

from __future__ import annotations

import subprocess
import sys

MODULE = """
import os, pytest
pytestmark = pytest.mark.xdist_group("{group}")

@pytest.fixture(scope="module")
def built():
    with open({log!r}, "a") as f:
        f.write("{group} " + os.environ["PYTEST_XDIST_WORKER"] + "\\n")

{tests}
"""


def test_a_marked_module_runs_on_one_worker_and_builds_its_fixture_once(tmp_path):
    log = tmp_path / "setups.log"
    tests = "\n".join(f"def test_{i}(built):\n    pass\n" for i in range(8))
    for group in ("alpha", "beta"):
        text = MODULE.format(group=group, log=str(log), tests=tests)
        (tmp_path / f"test_{group}.py").write_text(text)
    (tmp_path / "pytest.ini").write_text("[pytest]\n")  # not the project's options
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-n", "2", "--dist", "loadgroup"]
        + ["-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    setups = log.read_text().split("\n")[:-1]
    assert sorted(s.split()[0] for s in setups) == ["alpha", "beta"], setups
