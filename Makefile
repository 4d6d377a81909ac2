# One venv at the repo root holds everything; every target is idempotent.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup test demo train-demo clean

$(STAMP): requirements.txt requirements-test.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-test.txt
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
