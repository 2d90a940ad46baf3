# `make test` works on a fresh machine with only Python: it creates .venv, installs the pinned CPU
# torch wheel, then the project with its test extra, then runs the suite.
#
# GPU users who already have a CUDA torch: `make test TORCH_SPEC= VENV_FLAGS=--system-site-packages`
# (no torch is installed; the environment's own is used), or `pip install -e '.[test]'` in your env.

PYTHON ?= python3
VENV ?= .venv
VENV_FLAGS ?=
TORCH_SPEC ?= torch==2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast lint bench-dit bench-t5 bench-vae bench-data bench-probe bench-train bench-sample bench-step clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	@# torch alone first: later installs see it satisfied and never pull a multi-GB CUDA build.
	if [ -n "$(TORCH_SPEC)" ]; then $(PY) -m pip install -q "$(TORCH_SPEC)"; fi
	$(PY) -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

# The demo: tiny random Wan models trained on a synthetic dataset by 2 CPU processes (a fresh run each time),
# then one short video sampled from the final checkpoint (tools/sample.py prints where the files went).
demo: $(STAMP)
	$(PY) -m tools.make_demo_data output/demo-data
	rm -rf output/debug
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m train.main --cfg configs/debug.toml
	$(PY) -m tools.sample --checkpoint output/debug/checkpoint-100 --frames 9 --size 64x64 --steps 10 \
		--prompt "a blue square moves top to bottom over a green background" --out output/debug/demo-sample

test: $(STAMP)
	$(PY) -m pytest -q

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

bench-dit: $(STAMP)
	$(PY) bench/dit.py

bench-t5: $(STAMP)
	$(PY) bench/t5.py

bench-vae: $(STAMP)
	$(PY) bench/vae.py

bench-data: $(STAMP)
	$(PY) bench/data.py

bench-probe: $(STAMP)
	$(PY) bench/probe_metadata.py

bench-train: $(STAMP)
	$(PY) bench/train_step.py

bench-sample: $(STAMP)
	$(PY) bench/sample.py

bench-step: $(STAMP)
	$(PY) bench/gpu_step.py

clean:
	rm -rf $(VENV) .pytest_cache
