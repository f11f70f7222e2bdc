"""TensorFlow's load banners go to the DEBUG log; anything else written to stderr meanwhile stays."""

from __future__ import annotations

import logging
import os

from worker.serving import tf_backend


def test_load_banners_are_logged_at_debug_and_other_stderr_output_is_kept(capfd, caplog):
    caplog.set_level(logging.DEBUG, logger=tf_backend.__name__)
    with tf_backend._banners_to_debug_log():
        os.write(2, b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n")
        os.write(2, b"I0000 00:00:17 1 port.cc:153] oneDNN custom operations are on. You may see ...\n")
        os.write(2, b'{"severity": "INFO", "message": "another thread logged this"}\n')
    err = capfd.readouterr().err
    assert err == '{"severity": "INFO", "message": "another thread logged this"}\n'
    banners = [r.getMessage() for r in caplog.records if r.levelno == logging.DEBUG]
    assert len(banners) == 2 and "oneDNN custom operations are on" in banners[1]
    os.write(2, b"after\n")
    assert capfd.readouterr().err == "after\n"  # stderr is itself again
