"""What TensorFlow writes, as the worker passes it on: load banners go to the DEBUG log (anything else
written to stderr meanwhile stays); a refused batch is told by its cause, without the framing."""

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


def test_a_refused_batch_is_told_by_its_cause_not_by_the_graphs_framing():
    """TensorFlow frames a graph's errors (heading, where the node was defined, the node); the
    error line gives the cause, as TF Serving's does."""
    with_trace = (
        "Graph execution error:\n\nDetected at node 'embed/Gather' defined at (most recent call last):\n"
        "    File \"train.py\", line 12, in <module>\n      model = build()\nNode: 'embed/Gather'\n"
        "indices[0,1] = 100 is not in [0, 100)\n\t [[{{node embed/Gather}}]] [Op:__inference_serve_94]"
    )
    assert tf_backend._cause(with_trace) == "indices[0,1] = 100 is not in [0, 100)"
    nested = "Graph execution error:\n\n{{function_node __inference_embed_7}} indices[0] = 5 is not in [0, 3)"
    assert tf_backend._cause(nested) == "indices[0] = 5 is not in [0, 3)"
    assert tf_backend._cause("Incompatible shapes: [2,3] vs. [2,4]") == "Incompatible shapes: [2,3] vs. [2,4]"
