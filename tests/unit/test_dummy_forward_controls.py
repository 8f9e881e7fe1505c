"""The negative controls' reading of a failed run: only the mechanism counts as caught.

``parity.harness.checks.dummy_forward_controls`` decides from a child's log and trace how a rank
ended, predicts from the model where the collectives stop pairing up, and judges the two. A
control that accepted "any crash" would also pass when the harness itself breaks, so each wrong
ending here must come out as a tool error (or "not caught"), not as caught. The texts are what
gloo and the children write (taken from real runs on torch 2.13).
"""

from __future__ import annotations

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from parity.harness import toy  # noqa: E402
from parity.harness.checks import dummy_forward_check as worker  # noqa: E402
from parity.harness.checks.dummy_forward_controls import (  # noqa: E402
    Prediction,
    classify,
    judge,
    predict,
)

ABORT = (
    "terminate called after throwing an instance of 'gloo::EnforceNotMet'\n"
    "  what():  [enforce fail at /__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:456] "
    "op.preamble.length <= op.nbytes. 590848 vs 165248. Received data size doesn't match expected size. "
    "Is there a distributed collective mismatch in your code?\nFatal Python error: Aborted\n"
)
RESET = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error "
    "[127.0.0.1]:10448: Connection reset by peer. This is typically caused by a remote worker hanging\n"
)
TIMEOUT = (
    "RuntimeError: [/__w/pytorch/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
    "Timed out waiting 10000ms for recv operation to complete\n"
)
STORE_TIMEOUT = (
    "[E1201 09:41:35.341362805 socket.cpp:1028] [c10d] The client socket has timed out after 10000ms "
    "while trying to connect to (127.0.0.1, 43145).\n"
)
TRACE_0 = "modalities image,video\nready\nenter <root>\nenter model.visual.blocks.0\n"
TRACE_1 = (
    "modalities -\nready\nenter <root>\nenter model.language_model.layers.0\n"
    "enter model.language_model.layers.1\n"
)


@pytest.fixture(scope="module")
def prediction() -> Prediction:
    """qwen2_5_vl, rank 0 images + video, rank 1 text only (the basic asymmetric step)."""
    model = toy.build_model(toy.load_config("qwen2_5_vl"), attn_implementation="eager")
    mods = {r: worker.modalities_of(m, "vlm") for r, m in enumerate(worker.SCENARIOS["all_vs_none"])}
    return predict(model, mods, 2)


def test_classify_reads_each_kind():
    mismatch = classify(0, -6, ABORT, TRACE_0)
    assert (mismatch.kind, mismatch.last_unit) == ("mismatch", "model.visual.blocks.0")
    assert mismatch.sizes == (590848, 165248)
    assert classify(1, 1, RESET, TRACE_1).kind == "peer_lost"
    # torchrun's SIGTERM reached rank 1 before gloo's reset did: still the lost peer, not an error
    assert classify(1, -15, "  File \"<frozen runpy>\", line 198\n", TRACE_1).kind == "peer_lost"
    assert classify(1, 1, "  File \"<frozen runpy>\", line 198\n", TRACE_1).kind == "error"  # control
    assert classify(1, 1, TIMEOUT, TRACE_1).kind == "timeout"
    assert classify(1, -9, "", TRACE_1, watchdog=True).source == "watchdog"
    assert classify(0, 0, "", TRACE_0 + "backward\nallreduce\ndone\n").kind == "finished"
    # A rendezvous that never came up is the harness failing, whatever the word "timed out" says.
    assert classify(0, 1, STORE_TIMEOUT, "").kind == "error"
    model_error = "ValueError: Image features and image tokens do not match\n"
    assert classify(0, 1, model_error, TRACE_0).kind == "error"


def test_prediction_follows_the_model(prediction: Prediction):
    assert prediction.kind == "mismatch" and prediction.rank == 0 and prediction.index == 1
    assert prediction.modules == {0: "model.visual.blocks.0", 1: "model.language_model.layers.0"}
    layers = ["model.language_model.layers.0", "model.language_model.layers.1"]
    assert prediction.sequences[1] == ["<root>", *layers]
    # gloo's byte counts are proportional to the two units' shards (590848 / 165248).
    assert prediction.shard_numel[1] / prediction.shard_numel[0] == pytest.approx(590848 / 165248)


def test_only_the_predicted_failure_is_caught(prediction: Prediction):
    good = {0: classify(0, -6, ABORT, TRACE_0), 1: classify(1, 1, RESET, TRACE_1)}
    assert judge(prediction, good) == ("caught", [])

    wrong_rank = {0: classify(0, 1, RESET, TRACE_0), 1: classify(1, -6, ABORT, TRACE_1)}
    assert judge(prediction, wrong_rank)[0] == "tool error"

    elsewhere = {0: classify(0, -6, ABORT, TRACE_0 + "enter model.visual.blocks.1\n"), 1: good[1]}
    verdict, problems = judge(prediction, elsewhere)
    assert verdict == "tool error" and "failed in model.visual.blocks.1" in problems[0]

    python_error = {0: classify(0, 1, "KeyError: 'pixel_values'\n", TRACE_0), 1: good[1]}
    assert judge(prediction, python_error)[0] == "tool error"

    sizes = {0: classify(0, -6, ABORT.replace("590848 vs", "123 vs"), TRACE_0), 1: good[1]}
    assert "not the shards" in judge(prediction, sizes)[1][0]

    done = classify(0, 0, "", TRACE_0 + "done\n")
    assert judge(prediction, {0: done, 1: classify(1, 0, "", TRACE_1 + "done\n")})[0] == "not caught"


def test_symmetric_steps_and_timeouts():
    """Same units on both ranks: nothing to show. Units that pair up silently: only a timeout counts."""
    model = toy.build_model(toy.load_config("qwen2_5_vl"), attn_implementation="eager")
    same = predict(model, {0: ("image",), 1: ("video",)}, 2)  # one vision pass each
    assert same.kind == "none"
    assert (
        judge(same, {0: classify(0, 0, "", TRACE_0 + "done\n"), 1: classify(1, 0, "", TRACE_1 + "done\n")})[0]
        == "tool error"
    )
    silent = Prediction("timeout", None, None, {}, {}, {})
    hang = {0: classify(0, 1, TIMEOUT, TRACE_0), 1: classify(1, 1, RESET, TRACE_1)}
    assert judge(silent, hang)[0] == "caught"
    lost = {0: classify(0, 1, RESET, TRACE_0), 1: classify(1, 1, RESET, TRACE_1)}
    assert judge(silent, lost)[0] == "tool error"


def test_watchdog_dumps_and_kills_a_stuck_child(tmp_path):
    """A child that never gets anywhere is stopped at the deadline, with its stack in its log."""
    import signal
    import socket

    from parity.harness.checks import dummy_forward_controls as controls

    with socket.socket() as sock:  # a port nobody listens on: rank 1 waits for its rendezvous
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    job = {
        "id": "stuck",
        "config": "qwen2_5_vl",
        "batch": "vlm_batch",
        "patch_size": 14,
        "scenario": "all_vs_none",
        "rank": 1,
        "world": 2,
        "port": port,
        "pg_timeout_s": 60.0,
        "store_timeout_s": 60.0,
        "log": str(tmp_path / "rank1.log"),
        "trace": str(tmp_path / "rank1.trace"),
    }
    controls._warm_up()  # the forkserver the job uses (its preload is most of this test's time)
    exitcode, watchdog = controls._run_child(job, deadline_s=3.0)
    log = (tmp_path / "rank1.log").read_text()
    assert watchdog and exitcode == -signal.SIGKILL
    assert "Current thread" in log or "Thread 0x" in log, log[-500:]  # faulthandler's SIGUSR1 dump
    outcome = classify(1, exitcode, log, (tmp_path / "rank1.trace").read_text(), watchdog=True)
    assert outcome.kind == "error" and "did not reach the step" in outcome.message  # not a collective timeout
