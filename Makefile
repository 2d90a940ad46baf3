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

.PHONY: install demo test test-heavy test-fast lint bench-dit bench-t5 bench-vae bench-data bench-probe bench-train bench-sample bench-step bench-sp bench-cache gpu-check gpu-wheels clean

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
	@# LoRA on the DiT just trained (merged into a folder as a released DiT would be), exported for ComfyUI.
	$(PY) -m tools.zero_to_bf16 output/debug/checkpoint-100 output/debug/merged
	rm -rf output/debug-lora
	OMP_NUM_THREADS=1 $(PY) -m torch.distributed.run --standalone --nproc_per_node 2 -m train.main --cfg configs/debug_lora.toml
	$(PY) -m tools.export_lora output/debug-lora/checkpoint-100 output/debug-lora/lora.safetensors
	$(PY) -m tools.sample --checkpoint output/debug/checkpoint-100 --lora output/debug-lora/lora.safetensors \
		--frames 9 --size 64x64 --steps 10 --prompt "a blue square moves top to bottom over a green background" \
		--out output/debug-lora/demo-sample

# Everything but the `heavy` tier (inductor compiles, memory measurements, the GPU check's dry run: about
# 10 minutes more), which `make test-heavy` and CI (.ci/run) run.
test: $(STAMP)
	$(PY) -m pytest -q -m "not heavy"

test-heavy: $(STAMP)
	$(PY) -m pytest -q -m heavy

# In-process tests only; WAN_TESTS_CHECK_SLOW fails a test not marked slow that starts a process.
test-fast: $(STAMP)
	WAN_TESTS_CHECK_SLOW=1 $(PY) -m pytest -q -m "not slow"

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

bench-sp: $(STAMP)
	$(PY) bench/sequence_parallel.py

bench-cache: $(STAMP)
	$(PY) bench/cache.py

# `make gpu-check` on a GPU machine (bench/gpu_check.py: every CUDA path in at most 8.5 minutes, one table).
# No venv there: the system python3 with its CUDA torch, plus the wheels it lacks carried in .whl (made
# here by `make gpu-wheels`), installed into /tmp/site when that python cannot import them.
# GPU_CHECK_ARGS: e.g. --out_dir $$OUT; here, the CPU dry run: GPU_PYTHON=.venv/bin/python GPU_CHECK_ARGS=--tiny
GPU_PYTHON ?= python3
GPU_WHEELS ?= .whl
GPU_SITE ?= /tmp/site
GPU_CHECK_ARGS ?=
gpu-check:
	@site=""; \
	if [ -d $(GPU_WHEELS) ] && ! $(GPU_PYTHON) -c "import deepspeed, diffusers, av, ftfy" >/dev/null 2>&1; then \
		$(GPU_PYTHON) -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
			--target $(GPU_SITE) $(GPU_WHEELS)/*.whl || exit 1; \
		echo "installed the wheels of $(GPU_WHEELS) into $(GPU_SITE)"; site=$(GPU_SITE); \
	fi; \
	echo "$(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)"; \
	PYTHONPATH=$${site}$${site:+$${PYTHONPATH:+:}}$${PYTHONPATH} $(GPU_PYTHON) bench/gpu_check.py $(GPU_CHECK_ARGS)

# The packages the GPU image lacks, as cp312 manylinux wheels in .whl (ignored by git through
# .git/info/exclude; about 46 MB), at the versions of this machine's .venv. DeepSpeed is an sdist on the
# index: `pip wheel` builds its pure-Python wheel.
# importlib-metadata needs lazy-importer; pydantic needs typing-extensions >= 4.16 (newer than the image's may
# be); zipp as importlib-metadata wants it: carried too, so nothing depends on the image's versions of them.
GPU_WHEEL_PACKAGES := diffusers av ftfy wcwidth hjson pydantic pydantic-core annotated-types \
	typing-inspection importlib-metadata lazy-importer typing-extensions zipp
gpu-wheels: $(STAMP)
	rm -rf $(GPU_WHEELS) && mkdir -p $(GPU_WHEELS)  # one version of each: two would stop the install
	grep -qxF '/$(GPU_WHEELS)/' .git/info/exclude 2>/dev/null || echo '/$(GPU_WHEELS)/' >> .git/info/exclude
	$(PY) -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		--abi cp312 --abi abi3 --abi none --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		--platform manylinux_2_27_x86_64 --platform manylinux_2_28_x86_64 --platform any -d $(GPU_WHEELS) \
		$$($(PY) -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in '$(GPU_WHEEL_PACKAGES)'.split()))")
	$(PY) -m pip wheel -q --no-deps -w $(GPU_WHEELS) "deepspeed==$$($(PY) -c 'import importlib.metadata as m; print(m.version("deepspeed"))')"
	@du -sh $(GPU_WHEELS); ls $(GPU_WHEELS)

clean:
	rm -rf $(VENV) .pytest_cache
