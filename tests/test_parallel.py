"""Tensor-parallel inference (model_parallel = 2) launched through scripts/msrun_launcher.sh on CPU workers.

Two real launches of run_mindformer.py: a full checkpoint sliced while loading (--auto_trans_ckpt True, which
also saves the shards) and a pre-sharded directory from `convert_weight.py --model_parallel 2`. Both give the
HuggingFace greedy tokens, which test_run_mindformer.py shows the single-card run gives too; each worker's
log says how many parameters its rank holds. The errors are checked without msrun where the code allows,
and the world-size check and the launcher's own argument handling and exit status through small launches.
"""
import contextlib
import json
import math
import os
import re
import shlex
import signal
import socket
import subprocess
import textwrap
import time

import pytest

from conftest import PLUGIN, REPO
from convert_weight import convert_llava
from llava_checkpoint import CheckpointError, iter_checkpoint
from llava_layout import checkpoint_layout
from llava_model import FLOAT32, CLIPSelfAttention, LlamaAttention, TensorParallel
from llava_weights import HFFolder, WeightsFile, load_weights, rank_directory, sharded_layout
from test_run_mindformer import QUESTION, hf_greedy_ids, setup  # noqa: F401  (setup: a fixture)

LAUNCHER = os.path.join(REPO, "scripts", "msrun_launcher.sh")
CLUSTER_TIME_OUT = 90  # seconds for the workers to find each other; the machine may be busy


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def launch(command_line, workers, log_dir, cwd, env=None, timeout=240):
    """`bash msrun_launcher.sh "CMD" WORKERS PORT LOG_DIR True TIMEOUT` (the 6-argument form)."""
    return subprocess.run(["bash", LAUNCHER, command_line, str(workers), str(free_port()), str(log_dir), "True",
                           str(CLUSTER_TIME_OUT)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def worker_logs(log_dir):
    logs = {}
    for name in os.listdir(log_dir):
        match = re.fullmatch(r"worker_(\d+)\.log", name)
        if match:
            with open(os.path.join(log_dir, name), errors="replace") as f:
                logs[int(match.group(1))] = f.read()
    return logs


def predict_command(setup, checkpoint, output_dir, auto_trans_ckpt, model_parallel=2):
    """The seed's calling form, as one string: the multi-word prompt is quoted inside it."""
    arguments = [
        os.path.join(REPO, "run_mindformer.py"), "--config", setup["yaml"], "--register_path", PLUGIN,
        "--run_mode", "predict", "--predict_data", setup["image"], QUESTION, "--modal_type", "image", "text",
        "--load_checkpoint", checkpoint, "--use_parallel", "True", "--auto_trans_ckpt", str(auto_trans_ckpt),
        "--device_target", "CPU", "--output_dir", str(output_dir), "--verbose",
        "--options", f"parallel_config.model_parallel={model_parallel}",
        "model.model_config.compute_dtype=float32", "model.model_config.param_init_type=float32"]
    return shlex.join(arguments)


def results(output_dir):
    with open(os.path.join(output_dir, "predict_results.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def expected(setup):
    """HF greedy ids, and the single-card parameter counts from the checkpoint layout."""
    ids, _ = hf_greedy_ids(setup)
    config = HFFolder(str(setup["root"] / "hf")).config()
    layout = checkpoint_layout(config)
    decoder = {name: math.prod(shape) for name, shape in layout.items() if name.startswith("language_model.layers.")}
    return {"ids": ids, "config": config, "total": sum(math.prod(shape) for shape in layout.values()),
            "decoder": sum(decoder.values()),
            # RMSNorm weights are the decoder's only replicated parameters; every matrix is split in two.
            "decoder_norms": sum(size for name, size in decoder.items() if "layernorm" in name)}


RANK_LINE = re.compile(r"rank (\d+)/(\d+) holds (\d+) parameters, (\d+) in the decoder layers")


def check_parallel_run(result, output_dir, log_dir, expected):
    assert result.returncode == 0, result.stderr[-3000:] + "".join(worker_logs(log_dir).values())[-5000:]
    rows = results(output_dir)
    assert [row["token_ids"] for row in rows] == [expected["ids"]]
    assert rows[0]["prompt"] == QUESTION  # the quoted prompt reached the workers as one argument
    logs = worker_logs(log_dir)
    assert sorted(logs) == [0, 1]
    answer = f"{QUESTION}\n{rows[0]['text']}\n"  # as run_mindformer.py prints it
    assert answer in logs[0] and answer not in logs[1]  # rank 0 prints the answer, rank 1 does not
    counts = {}
    for rank, text in logs.items():
        lines = RANK_LINE.findall(text)
        assert len(lines) == 1, text[-3000:]
        counts[int(lines[0][0])] = (int(lines[0][1]), int(lines[0][2]), int(lines[0][3]))
    norms, decoder = expected["decoder_norms"], expected["decoder"]
    for rank in (0, 1):
        size, total, rank_decoder = counts[rank]
        assert size == 2
        # Half of the decoder's matrices plus its (replicated) norm weights: within 0.5% of half the decoder.
        assert rank_decoder == (decoder - norms) // 2 + norms
        assert abs(rank_decoder - decoder / 2) <= 0.005 * decoder
        assert total - rank_decoder == counts[1 - rank][1] - counts[1 - rank][2]  # the rest is alike
        assert total < expected["total"]


@pytest.mark.parametrize("source", ["ckpt", "hf"])
def test_auto_trans_ckpt_slices_a_full_checkpoint(setup, expected, tmp_path, source):
    """A converted .ckpt, or the HF folder itself (each rank reads little more than its own slices)."""
    output_dir, log_dir = tmp_path / "out", tmp_path / "log"
    checkpoint = setup["ckpt"] if source == "ckpt" else str(setup["root"] / "hf")
    result = launch(predict_command(setup, checkpoint, output_dir, True), 2, log_dir, tmp_path)
    check_parallel_run(result, output_dir, log_dir, expected)
    shards = output_dir / "transformed_checkpoint"
    assert sorted(os.listdir(shards)) == ["rank_0", "rank_1"]
    layout = sharded_layout(expected["config"], 2)
    for rank in (0, 1):
        assert os.listdir(shards / f"rank_{rank}") == ["llava.ckpt"]
        assert {name: array.shape for name, array in iter_checkpoint(str(shards / f"rank_{rank}" / "llava.ckpt"))
                } == layout
    # The converter writes the same shards from the HF weights, byte for byte.
    converted = convert_llava(str(setup["root"] / "hf"), str(tmp_path / "converted"), progress=False,
                              model_parallel=2)
    for rank, path in enumerate(converted.output_files):
        with open(path, "rb") as mine, open(shards / f"rank_{rank}" / "llava.ckpt", "rb") as theirs:
            assert mine.read() == theirs.read(), rank


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_pre_sharded_directory_from_convert_weight(setup, expected, tmp_path, fmt):
    # What `convert_weight.py --model_parallel 2 [--format safetensors]` does (its command line: test_convert.py).
    sharded = tmp_path / "sharded"
    convert_llava(str(setup["root"] / "hf"), str(sharded), progress=False, model_parallel=2, fmt=fmt)
    output_dir, log_dir = tmp_path / "out", tmp_path / "log"
    result = launch(predict_command(setup, str(sharded), output_dir, False), 2, log_dir, tmp_path)
    check_parallel_run(result, output_dir, log_dir, expected)
    assert not os.path.exists(output_dir / "transformed_checkpoint")  # loaded as it is


# ----------------------------------------------------------------------------------------------------------
# Clear errors.
# ----------------------------------------------------------------------------------------------------------

def test_model_parallel_not_dividing_the_heads(expected):
    config = expected["config"]  # 4 heads in each tower
    with pytest.raises(ValueError, match="model_parallel=3 does not divide the 4 vision attention heads"):
        sharded_layout(config, 3)
    with pytest.raises(ValueError, match="model_parallel=3 does not divide the 4 text attention heads"):
        LlamaAttention(config.text_config, FLOAT32, tensor_parallel=TensorParallel(3, 0))
    with pytest.raises(ValueError, match="model_parallel=3 does not divide the 4 vision attention heads"):
        CLIPSelfAttention(config.vision_config, FLOAT32, tensor_parallel=TensorParallel(3, 0))


class _RankOf:
    """Stands in for a model whose parameters are never reached: the errors come first."""

    def __init__(self, rank, size=2):
        self.tensor_parallel = TensorParallel(size, rank)


def test_missing_rank_directory(setup, tmp_path):
    convert_llava(str(setup["root"] / "hf"), str(tmp_path / "sharded"), progress=False, model_parallel=2)
    os.rename(tmp_path / "sharded" / "rank_1", tmp_path / "elsewhere")
    with pytest.raises(CheckpointError, match="no directory rank_1 for rank 1"):
        rank_directory(str(tmp_path / "sharded"), 1)
    with pytest.raises(CheckpointError, match="no directory rank_1 for rank 1"):
        load_weights(_RankOf(1), str(tmp_path / "sharded"))
    assert WeightsFile(rank_directory(str(tmp_path / "sharded"), 0)).path.endswith(os.path.join("rank_0", "llava.ckpt"))


def test_full_checkpoint_needs_auto_trans_ckpt(setup):
    with pytest.raises(CheckpointError, match=r"full checkpoint but model_parallel=2: pass --auto_trans_ckpt True"):
        load_weights(_RankOf(0), setup["ckpt"], auto_trans_ckpt=False)


def test_world_size_must_match_the_parallel_config(setup, tmp_path):
    output_dir, log_dir = tmp_path / "out", tmp_path / "log"
    command_line = predict_command(setup, setup["ckpt"], output_dir, True, model_parallel=1)
    result = launch(command_line.replace(" --verbose", ""), 2, log_dir, tmp_path)
    assert result.returncode == 2  # the workers' status for bad input, not msrun's 1
    assert re.fullmatch(f"msrun_launcher.sh: worker [01] failed with exit status 2; see {log_dir}/worker_[01].log",
                        result.stderr.strip().splitlines()[-1])
    errors = [line for text in worker_logs(log_dir).values() for line in text.splitlines()
              if line.startswith("run_mindformer.py: error:")]
    assert errors, worker_logs(log_dir)
    assert errors[0] == ("run_mindformer.py: error: world size 2 != model_parallel 1 x data_parallel 1: "
                         "launch as many workers as the parallel_config asks for")
    assert not os.path.exists(output_dir / "predict_results.jsonl")


# ----------------------------------------------------------------------------------------------------------
# The launcher: quoting and exit status (a tiny script instead of the model; one worker).
# ----------------------------------------------------------------------------------------------------------

ARGV_SCRIPT = textwrap.dedent("""\
    import json, os, sys
    role = os.environ.get("MS_ROLE", "none")  # msrun runs the command as the scheduler too
    with open(os.path.join(os.environ["ARGV_DIR"], role + ".json"), "w") as f:
        json.dump({"argv": sys.argv[1:], "prefix": sys.prefix}, f)
    sys.exit(int(os.environ.get("WORKER_EXIT", "0")) if role == "MS_WORKER" else 0)
""")


@pytest.fixture()
def argv_script(tmp_path):
    path = tmp_path / "print_argv.py"
    path.write_text(ARGV_SCRIPT)
    return path


def test_launcher_keeps_quoted_arguments_whole(argv_script, tmp_path):
    command_line = f"{argv_script} --predict_data photo.png 'What is shown in this image?' \"two words\" '$HOME' plain"
    env = dict(os.environ, ARGV_DIR=str(tmp_path))
    result = launch(command_line, 1, tmp_path / "log", tmp_path, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    with open(tmp_path / "MS_WORKER.json") as f:
        seen = json.load(f)
    assert seen["argv"] == ["--predict_data", "photo.png", QUESTION, "two words", "$HOME", "plain"]
    assert os.path.realpath(seen["prefix"]) == os.path.realpath(os.path.join(REPO, ".venv"))  # the project's python
    assert os.path.isfile(tmp_path / "log" / "worker_0.log")


def test_launcher_fails_when_a_worker_fails(argv_script, tmp_path):
    """msrun reports any failure as its own exit 1 with a traceback; the launcher names the worker and exits with
    its status."""
    env = dict(os.environ, ARGV_DIR=str(tmp_path), WORKER_EXIT="3")
    result = launch(f"{argv_script} x", 1, tmp_path / "log", tmp_path, env=env, timeout=120)
    assert result.returncode == 3
    assert result.stderr.strip().splitlines()[-1] == (f"msrun_launcher.sh: worker 0 failed with exit status 3; "
                                                      f"see {tmp_path / 'log'}/worker_0.log")
    assert "Traceback" not in result.stderr


def test_launcher_ctrl_c_is_one_line(tmp_path):
    script = tmp_path / "sleep.py"
    script.write_text("import time\ntime.sleep(600)\n")
    process = subprocess.Popen(["bash", LAUNCHER, str(script), "1", str(free_port()), str(tmp_path / "log"), "True",
                                str(CLUSTER_TIME_OUT)], cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not os.path.exists(tmp_path / "log" / "worker_0.log"):
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.1)
        time.sleep(1)
        os.killpg(process.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, stderr = process.communicate(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130
    assert stderr.strip().splitlines()[-1] == ("msrun_launcher.sh: interrupted; workers stopped, logs in "
                                               f"{tmp_path / 'log'}")


def test_launcher_usage_errors(tmp_path):
    for arguments, message in (([], ""), (["cmd.py", "2", "3"], "expected 1, 2, 6 or 10 arguments, got 3"),
                               (["cmd.py", "two"], "'two' is not a number"), (["  ", "1"], "empty command"),
                               (["cmd.py 'unbalanced", "1"], "cannot split CMD: No closing quotation")):
        result = subprocess.run(["bash", LAUNCHER, *arguments], cwd=tmp_path, capture_output=True, text=True,
                                timeout=30)
        assert result.returncode == 2, (arguments, result.stderr)
        assert message in result.stderr and "Several nodes" in result.stderr  # the error, then the usage
    assert os.listdir(tmp_path) == []  # nothing was launched


def test_sharded_directory_for_another_model_parallel_is_refused(tmp_path):
    """A 2-rank directory given to a single-card run: the message says the shard count does not fit."""
    from hf_reference import make_hf_llava
    from llava_checkpoint import CheckpointError
    from llava_model import LlavaVlm
    from llava_weights import load_weights
    from test_model import llava_config_from_hf

    for rank in range(2):
        (tmp_path / f"rank_{rank}").mkdir()
        (tmp_path / f"rank_{rank}" / "llava.ckpt").write_bytes(b"")
    model = LlavaVlm(llava_config_from_hf(make_hf_llava("small").config))
    with pytest.raises(CheckpointError, match="shards for 2 ranks but model_parallel is 1"):
        load_weights(model, str(tmp_path))
