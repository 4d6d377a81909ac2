"""Test set-up: the plugin directory and the test helpers importable, MindSpore on CPU in PyNative."""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.path.join(REPO, "research", "llava")
DEMO = os.path.join(REPO, "demo")  # the bundled tiny model: its task, trainer and assets
TINY = os.path.join(DEMO, "llava_tiny")
# Reference files kept in the repository (copied from the project's shared/reference): the LLaMA-2
# tokenizer.model and the tensor list of llava-hf/llava-1.5-7b-hf.
REFERENCE_DIR = os.path.join(REPO, "tests", "data")
for path in (REPO, PLUGIN, DEMO, os.path.join(REPO, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
os.environ.setdefault("GLOG_v", "3")

# MindSpore switches protobuf to its pure-Python mode; importing it after transformers has loaded protobuf
# crashes, so it is imported first, whatever order the test modules come in.
import mindspore  # noqa: E402,F401  pylint: disable=wrong-import-position,unused-import

import pytest  # noqa: E402  pylint: disable=wrong-import-position
from mindformers.tools.register import MindFormerRegister  # noqa: E402  pylint: disable=wrong-import-position


@pytest.fixture(autouse=True, scope="module")
def isolated_registry():
    """Each test module starts from the registry as imported. Building from a YAML's `auto_register:` keys
    re-registers our classes from MindFormers' copies in ./modules, which would otherwise leak into later
    modules' identity checks (`get_cls(...) is LlavaTokenizer`)."""
    saved = {kind: dict(entries) for kind, entries in MindFormerRegister.registry.items()}
    yield
    MindFormerRegister.registry.clear()
    MindFormerRegister.registry.update(saved)


@pytest.fixture
def kernel_paths():
    """llava_kernels.configure for one test (force a path: "decode" kernels for prompts, m_large...); the paths
    chosen at load afterwards."""
    import llava_kernels  # pylint: disable=import-outside-toplevel
    yield llava_kernels.configure
    llava_kernels.reset()


def free_port():
    import socket
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="session")
def live_server(tmp_path_factory):
    """serve.py with the bundled tiny model on 127.0.0.1 (a free port), as a user starts it: 4 cache rows (16
    clients must queue), an image cache of 30 KB (six of the tiny model's pictures) and a prefix cache of 200 KB
    (five prompts through a picture): eviction is reachable; local files allowed under a media directory.
    Yields {"url", "media", "log"}; stopped with Ctrl-C (SIGINT) at the end, which must exit 0."""
    import signal
    import subprocess
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("serve")
    media = root / "media"
    media.mkdir()
    port = free_port()
    log_path = root / "server.log"
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, os.path.join(REPO, "serve.py"), "--config", os.path.join(TINY, "predict_llava_tiny.yaml"),
             "--register_path", PLUGIN, "--load_checkpoint", os.path.join(TINY, "llava_tiny.ckpt"),
             "--port", str(port), "--max-batch-size", "4", "--image-cache-mb", "0.03",
             "--prefix-cache-mb", "0.2",
             "--allowed-local-media-path", str(media), "--output_dir", str(root / "output"), "--verbose",
             "--options", f"processor.tokenizer.vocab_file={os.path.join(TINY, 'tokenizer.model')}"],
            cwd=str(root), stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while True:
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.time() > deadline:
            process.kill()
            raise RuntimeError(f"serve.py did not become ready:\n{log_path.read_text()[-3000:]}")
        time.sleep(0.5)
    yield {"url": url, "media": media, "log": log_path}
    process.send_signal(signal.SIGINT)
    status = process.wait(timeout=60)
    assert status == 0, f"exit status {status}:\n" + log_path.read_text()[-3000:]
