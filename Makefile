# make setup: .venv with pinned dependencies; make test: setup if needed, then the test suite.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin

.PHONY: setup test speedrun bench clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first and pinned, so that nothing resolves it to a multi-GB CUDA build
	$(BIN)/pip install --quiet torch==2.13.0
	# CMAKE_BUILD_PARALLEL_LEVEL: llama-cpp-python (a test extra) compiles llama.cpp on every core
	CMAKE_BUILD_PARALLEL_LEVEL=$$(nproc) $(BIN)/pip install --quiet -e ".[test]"
	# llama.cpp's tokenizer test vectors, from the llama-cpp-python source package (test data only)
	bash tests/fetch_llamacpp_vocab.sh $(BIN)/pip
	# Debian's chromium for the chat page browser test (best effort, needs root; else the test skips)
	bash tests/install_chromium.sh
	touch $@

test: setup
	$(BIN)/python -m pytest -q -p no:cacheprovider tests

# make speedrun: setup if needed, then the whole lifecycle on the built-in world (SPEEDRUN_ARGS: e.g. --resume)
speedrun: setup
	$(BIN)/lmlab speedrun --out runs/speedrun $(SPEEDRUN_ARGS)

# make bench: every case of bench/ against its peer in the same run; each writes its section of docs/benchmarks.md
bench: setup
	$(BIN)/python bench/ceilings.py
	for p in tiny small llama-50m; do for d in float32 bfloat16; do \
		$(BIN)/python bench/train_step.py --preset $$p --dtype $$d --batch 8 --seq 256 --compile || exit 1; done; done
	$(BIN)/python bench/memory.py --preset small
	$(BIN)/python bench/memory.py --preset small --dtype bfloat16
	$(BIN)/python bench/decode.py
	$(BIN)/python bench/decode.py --batch 16
	$(BIN)/python bench/moe.py
	$(BIN)/python bench/tokenizer.py
	$(BIN)/python bench/serve.py
	# the CUDA path (bench/gpu.py), on a machine with a GPU only
	if $(BIN)/python -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then $(BIN)/python bench/gpu.py; fi

clean:
	rm -rf $(VENV) build *.egg-info
