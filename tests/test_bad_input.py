"""run_mindformer.py against careless or hostile input (issue 10), on the bundled tiny model: every mistake is one
line `run_mindformer.py: error: ...` and exit 2, found before the model is built; answers are appended to
predict_results.jsonl as they come, so Ctrl-C (or SIGTERM) keeps them, prints one line and exits 130.

The error cases call `main` in this process (they end before any model is built); the signal cases run the command
line, which is what they test."""
import io
import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest

import run_mindformer
from conftest import PLUGIN, REPO, TINY
from llava_runtime import SAME_INTERRUPT_S

YAML = os.path.join(TINY, "predict_llava_tiny.yaml")
CHECKPOINT = os.path.join(TINY, "llava_tiny.ckpt")
IMAGE = os.path.join(TINY, "demo.png")


def arguments(output_dir, data=(IMAGE, "What color is the circle?"), modal=("image", "text"), options=(),
              checkpoint=CHECKPOINT, config=YAML, extra=()):
    modal_type = ["--modal_type", *modal] if modal else []
    # The YAML's vocab_file is relative to the repository; these runs are elsewhere.
    options = [f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}", *options]
    return ["--config", config, "--register_path", PLUGIN, "--run_mode", "predict", "--device_target", "CPU",
            "--load_checkpoint", checkpoint, "--output_dir", str(output_dir), "--predict_data", *data, *modal_type,
            "--options", *options, *extra]


@pytest.fixture
def run_main(tmp_path, monkeypatch):
    """Calls run_mindformer.main in this process; returns (exit status, the lines it wrote to stderr). stderr is a
    fresh buffer per call: log handlers that main and MindFormers make bind to the stderr of the moment, and a
    pytest capture would be closed under them after the test. main's signal handlers are put back afterwards."""
    monkeypatch.chdir(tmp_path)
    saved_signal_handlers = {signum: signal.getsignal(signum) for signum in (signal.SIGINT, signal.SIGTERM)}
    saved_root_handlers = logging.root.handlers[:]

    def run(**kwargs):
        stderr = io.StringIO()
        monkeypatch.setattr(sys, "stderr", stderr)
        try:
            status = run_mindformer.main(arguments(tmp_path / "out", **kwargs))
        finally:
            for signum, handler in saved_signal_handlers.items():
                signal.signal(signum, handler)
            logging.root.handlers[:] = saved_root_handlers
        return status, stderr.getvalue().strip().splitlines()

    return run


def refused(run_main, **kwargs):
    status, lines = run_main(**kwargs)
    assert status == 2 and len(lines) == 1, "\n".join(lines)
    assert lines[0].startswith("run_mindformer.py: error: ")
    return lines[0]


# ----------------------------------------------------------------------------------------------- the command line

def test_predict_batch_size_must_be_positive(run_main):
    assert "batch_size must be an integer >= 1, got -1" in refused(run_main, extra=["--predict_batch_size", "-1"])


def test_modal_type_is_required(run_main):
    """Without it the image path was taken for a prompt."""
    assert "--predict_data needs --modal_type" in refused(run_main, modal=())


def test_more_than_one_image_per_example_is_refused(run_main):
    """`image text image` with two examples' worth of items used to drop the first image."""
    error = refused(run_main, data=(IMAGE, "Which?", IMAGE), modal=("image", "text", "image"))
    assert "--modal_type takes one 'text' and at most one 'image'" in error


def test_prompt_that_is_not_utf8(run_main):
    """Bytes that are not UTF-8 reach Python as lone surrogates (what `$'caf\\xe9'` in a UTF-8 shell gives)."""
    error = refused(run_main, data=(IMAGE, "caf\udce9?"))
    assert "--predict_data item 2 is not valid UTF-8: b'caf\\xe9?'" in error


def test_misspelt_option(run_main):
    error = refused(run_main, options=["model.model_config.max_new_token=5"])
    assert "did you mean 'model.model_config.max_new_tokens'?" in error


def test_empty_yaml(run_main, tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    assert "is empty" in refused(run_main, config=str(tmp_path / "empty.yaml"))


def test_directory_as_image_or_vocabulary(run_main, tmp_path):
    assert f"image file '{tmp_path}' is a directory" in refused(run_main, data=(str(tmp_path), "Hi"))
    error = refused(run_main, options=[f"processor.tokenizer.vocab_file={tmp_path}"])
    assert f"vocab_file '{tmp_path}' is a directory" in error


def test_output_dir_under_a_file(run_main, tmp_path):
    (tmp_path / "notes").write_text("")
    status, lines = run_main(extra=["--output_dir", str(tmp_path / "notes" / "out")])
    assert status == 2 and lines == [f"run_mindformer.py: error: output_dir {tmp_path / 'notes' / 'out'}: "
                                     f"{tmp_path / 'notes'} is a file, not a directory"]


def test_processor_image_size_not_the_models(run_main):
    error = refused(run_main, options=["model.model_config.vision_config.model_config.image_size=32"])
    assert "processor.image_size is 48 but" in error
    assert not os.path.exists("rank_0")


def test_every_input_is_checked_before_the_model_is_built(run_main, tmp_path):
    """A bad third input is named before anything runs. The checkpoint's tensors are garbage (its metadata, read
    first for the model's sizes, is whole): building and loading the model first would have failed on them."""
    garbage = tmp_path / "garbage.ckpt"
    with open(CHECKPOINT, "rb") as f:
        head = f.read(4096)
    length, shift, end = 0, 0, 1  # the metadata record: key 0x0a, a varint length, the message
    while True:
        length |= (head[end] & 0x7F) << shift
        shift, end = shift + 7, end + 1
        if not head[end - 1] & 0x80:
            break
    garbage.write_bytes(head[:end + length] + b"\x0a\x10 not a tensor at all")
    data = (IMAGE, "What color is the circle?", IMAGE, "How many shapes are there?", str(tmp_path / "gone.png"),
            "Describe the image.")
    error = refused(run_main, data=data, checkpoint=str(garbage))
    assert f"--predict_data example 3: image file '{tmp_path / 'gone.png'}' does not exist" in error
    assert (tmp_path / "out" / "predict_results.jsonl").read_text() == ""  # started empty: no stale answers
    error = refused(run_main, data=(IMAGE, "word " * 200), checkpoint=str(garbage))
    assert "--predict_data example 1: prompt 1 is" in error and "longer than the context seq_length 128" in error


# ----------------------------------------------------------------------------------------------- signals

def start(output_dir, data, cwd):
    return subprocess.Popen([sys.executable, os.path.join(REPO, "run_mindformer.py"), *arguments(output_dir, data)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_ctrl_c_during_generation_keeps_the_answers(tmp_path):
    questions = ["What color is the circle?", "How many shapes are there?", "Describe the image."] * 10
    data = [item for question in questions for item in (IMAGE, question)]
    results = tmp_path / "out" / "predict_results.jsonl"
    process = start(tmp_path / "out", data, tmp_path)
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_text().count("\n") >= 2):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    rows = [json.loads(line) for line in results.read_text().splitlines()]
    assert process.returncode == 130, stderr
    assert stderr.strip().splitlines() == [f"run_mindformer.py: interrupted; {len(rows)} of 30 answers kept in "
                                           f"{tmp_path / 'out' / 'predict_results.jsonl'}"]
    assert 2 <= len(rows) < 30
    assert [row["prompt"] for row in rows] == questions[:len(rows)]
    assert all(row["text"] in stdout for row in rows)


SAFE_POINTS = """
import os, signal, sys, time
sys.path.insert(0, {plugin!r})
from llava_runtime import interruption_point, interrupts_at_safe_points
with interrupts_at_safe_points("prog"):
    for signum in ({signals},):
        os.kill(os.getpid(), signum)
        time.sleep({gap})
    print("still running", flush=True)  # the first signal waits for a safe point
    try:
        interruption_point()
    except KeyboardInterrupt:
        print("interrupted at the safe point", flush=True)
    interruption_point()  # nothing pending any more
print("after the block", flush=True)
"""


@pytest.mark.parametrize("signals, gap", [(["SIGINT"], 0), (["SIGTERM"], 0), (["SIGINT", "SIGTERM"], 0),
                                          (["SIGINT", "SIGINT"], SAME_INTERRUPT_S + 0.2),
                                          (["SIGINT", "SIGTERM"], SAME_INTERRUPT_S + 0.2)])
def test_signals_wait_for_a_safe_point_and_a_second_leaves_at_once(signals, gap):
    """Generation and loading take Ctrl-C at safe points (a KeyboardInterrupt raised inside MindSpore's callbacks
    from C++ aborted the process: -6, answers lost); a second signal does not wait, unless it comes right after
    the first (MindSpore re-sends Ctrl-C as SIGTERM: one interrupt)."""
    code = SAFE_POINTS.format(plugin=PLUGIN, signals=", ".join(f"signal.{name}" for name in signals), gap=gap)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    if len(signals) == 1 or gap < SAME_INTERRUPT_S:
        assert (result.returncode, result.stderr) == (0, "")
        assert result.stdout.splitlines() == ["still running", "interrupted at the safe point", "after the block"]
    else:
        assert (result.returncode, result.stdout, result.stderr) == (130, "", "prog: interrupted\n")


@pytest.mark.parametrize("signum,delay", [(signal.SIGTERM, 0.5), (signal.SIGINT, 1.0), (signal.SIGTERM, 1.5),
                                          (signal.SIGINT, 2.5)])
def test_signal_during_start_up_is_one_line(tmp_path, signum, delay):
    """While MindSpore's C++ modules are imported (the first seconds), a KeyboardInterrupt raised inside their
    initialization aborted the process (134) or failed the import with a traceback (1)."""
    process = start(tmp_path / "out", [IMAGE, "Hi"], tmp_path)
    time.sleep(delay)
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130
    assert stderr.strip().splitlines() == ["run_mindformer.py: interrupted"]


GRAPH_FAILURE = """
import sys
sys.path.insert(0, {plugin!r})
import numpy as np
import mindspore as ms
from llava_runtime import set_up_context
set_up_context("CPU", mode=0, output_dir={output_dir!r})


@ms.jit
def sixteen_values_into_twenty_one(x):
    return ms.ops.reshape(x, (7, 3))


try:
    sixteen_values_into_twenty_one(ms.Tensor(np.ones((4, 4), np.float32)))
except ValueError:
    print("compile failed")
"""


def test_mindspore_failure_dumps_go_under_output_dir(tmp_path):
    """A graph that fails to compile makes MindSpore write rank_0/om/analyze_fail.ir, by default in the working
    directory (as a processor/model size mismatch once did in the user's)."""
    script = tmp_path / "fails_to_compile.py"  # a file: MindSpore parses the function's source
    script.write_text(GRAPH_FAILURE.format(plugin=PLUGIN, output_dir=str(tmp_path / "out")))
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert "compile failed" in result.stdout, result.stderr[-2000:]
    assert os.path.isfile(tmp_path / "out" / "rank_0" / "om" / "analyze_fail.ir")
    assert not os.path.exists(tmp_path / "rank_0")
