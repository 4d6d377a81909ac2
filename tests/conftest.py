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
