"""External tools that hang are stopped on purpose, with a message naming what hung."""

from __future__ import annotations

import time

import pytest

from components.core import trainer

pytestmark = pytest.mark.fault("fault: hangs")


@pytest.mark.slow
def test_training_workers_that_go_silent_are_stopped_and_named(tmp_path):
    log = tmp_path / "logs" / "train.log"
    started = time.monotonic()
    with pytest.raises(trainer.TrainingFailed, match=r"printed nothing for 12 s .*stall_timeout_s"):
        trainer.launch("tests.testing_utils.deepspeed:hang", {}, 2, log, stall_timeout_s=12)
    assert time.monotonic() - started < 90  # not the worker's hour
    assert "hang: started" in log.read_text()


def test_stall_timeout_is_validated():
    from components.core.config import TrainConfig

    with pytest.raises(ValueError, match="stall_timeout_s must be > 0"):
        TrainConfig(stall_timeout_s=0)
