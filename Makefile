# One venv at the repo root holds everything; every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo serve chat train-demo clean

# The CPU kernels (research/llava/llava_kernels.py) are built here too, so the first run does not wait for g++.
$(STAMP): requirements.txt requirements-test.txt research/llava/kernels/llava_kernels.cpp
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
	$(PY) research/llava/llava_kernels.py
	touch $(STAMP)

setup: $(STAMP)

# The bundled tiny LLaVA (demo/llava_tiny, trained on demo/shapes_task.py) answers questions about the
# bundled demo image through the same command line as the 7B model.
TINY := demo/llava_tiny

demo: setup
	$(PY) run_mindformer.py --config $(TINY)/predict_llava_tiny.yaml --register_path research/llava \
		--run_mode predict --device_target CPU --load_checkpoint $(TINY)/llava_tiny.ckpt --modal_type image text \
		--predict_data $(TINY)/demo.png "Describe the image." $(TINY)/demo.png "How many shapes are there?" \
		$(TINY)/demo.png "What color is the triangle?" $(TINY)/demo.png "What shape is blue?"

# The OpenAI-compatible server (and its chat page at http://127.0.0.1:8000/) with the tiny model; Ctrl-C stops it.
serve: setup
	$(PY) serve.py --config $(TINY)/predict_llava_tiny.yaml --register_path research/llava \
		--load_checkpoint $(TINY)/llava_tiny.ckpt --device_target CPU

# A terminal chat with the tiny model: `/image demo/llava_tiny/demo.png`, then questions; Ctrl-D quits.
chat: setup
	$(PY) run_mindformer.py --config $(TINY)/predict_llava_tiny.yaml --register_path research/llava \
		--run_mode chat --device_target CPU --load_checkpoint $(TINY)/llava_tiny.ckpt

# Rebuilds the tiny model from scratch: vocabulary and demo image (deterministic), then training on CPU
# (seeded; about 16 minutes on 2 cores), writing $(TINY)/llava_tiny.ckpt.
train-demo: setup
	$(PY) demo/tiny_assets.py $(TINY)
	$(PY) run_mindformer.py --config $(TINY)/finetune_llava_tiny.yaml --register_path research/llava \
		--run_mode finetune --options trainer.save_checkpoint=$(TINY)/llava_tiny.ckpt

test: setup
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV) output modules
