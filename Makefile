# Entry points, each doing all of its own set-up on a fresh Debian machine:
#   make demo         installs everything, then trains on the embedded demo corpus
#   make test         installs everything, then runs the test suite (CI runs it, then bench-gate)
#   make bench-gate   the throughput regression gate: the benchmarks' short mode, failing under a floor
#   make bench        every benchmark; its results into bench/results/ and the README's performance section
#   make transfer-demo  pretrain on the demo corpus, then linear probe and fine-tune on a labeled split, each beside
#                     the same from a random trunk (about 10 minutes on 2 CPU cores)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
NLTK_WORDNET := $(VENV)/nltk_data/corpora/wordnet
DEMO_FLAGS ?= --amp --output runs/demo

BENCH_JSON ?= .benchmarks/latest.json

TRANSFER_DIR ?= runs/transfer
FP := $(VENV)/bin/fastpretrain
CPU_FLAGS := --workers 2 --data-backend torch

.PHONY: setup demo transfer-demo test bench bench-gate wordnet clean

# Debian packages, as root or through sudo.
apt_install = if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi; \
	$$SUDO apt-get update -qq && $$SUDO apt-get install -y -qq $(1) >/dev/null

setup: $(VENV)/.installed $(NLTK_WORDNET)/lexnames $(VENV)/.cpp-built

$(VENV)/.installed: pyproject.toml requirements/pins.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c requirements/pins.txt -e '.[dali,test]'
	touch $@

# The C++ extensions compile on first use (about a minute on 2 cores); do it once here, not inside a run. The JPEG
# one links the system's libjpeg-turbo: its headers come from Debian's libjpeg62-turbo-dev.
$(VENV)/.cpp-built: $(VENV)/.installed csrc/hashtag_xent.cpp csrc/jpeg_region.cpp
	@if [ ! -f /usr/include/jpeglib.h ]; then $(call apt_install,libjpeg62-turbo-dev); fi
	$(PY) -c "from fastpretrain.cpp_extension import load_extension; load_extension('xent'); load_extension('jpeg')"
	touch $@

# WordNet 3.0 for nltk, offline: Debian's packages, copied (nltk refuses symlinks that leave its
# data root) into the venv's own nltk data folder, which nltk searches by default (sys.prefix/nltk_data).
# The Debian package lacks `lexnames`; ours ships in the package's assets.
$(NLTK_WORDNET)/lexnames: fastpretrain/assets/wordnet-lexnames
	@if [ ! -f /usr/share/wordnet/data.noun ]; then $(call apt_install,wordnet-base wordnet-sense-index); fi
	mkdir -p $(NLTK_WORDNET)
	cp -r /usr/share/wordnet/. $(NLTK_WORDNET)/
	cp fastpretrain/assets/wordnet-lexnames $@

wordnet: $(NLTK_WORDNET)/lexnames

demo: setup
	$(VENV)/bin/fastpretrain train $(DEMO_FLAGS)

# What a hashtag-pretrained trunk is for, in one command: each transfer beside the same from a random trunk.
transfer-demo: setup
	rm -rf $(TRANSFER_DIR)
	$(FP) train --output $(TRANSFER_DIR)/pretrain $(CPU_FLAGS)
	$(FP) synth --labeled --out $(TRANSFER_DIR)/labeled --image-size 64
	$(PY) -c "import torch; from fastpretrain.models import create_model; torch.manual_seed(0); \
	  torch.save(create_model('resnext_tiny', 1).state_dict(), '$(TRANSFER_DIR)/random-trunk.pt')"
	$(FP) probe --pretrained $(TRANSFER_DIR)/pretrain --data $(TRANSFER_DIR)/labeled --img-size 64 -b 64 \
	  --output $(TRANSFER_DIR)/probe $(CPU_FLAGS)
	$(FP) probe --pretrained $(TRANSFER_DIR)/random-trunk.pt --model resnext_tiny --data $(TRANSFER_DIR)/labeled \
	  --img-size 64 -b 64 --output $(TRANSFER_DIR)/probe-random $(CPU_FLAGS)
	$(FP) finetune --recipe finetune-demo --pretrained $(TRANSFER_DIR)/pretrain --data $(TRANSFER_DIR)/labeled \
	  --output $(TRANSFER_DIR)/finetune $(CPU_FLAGS)
	$(FP) finetune --recipe finetune-demo --data $(TRANSFER_DIR)/labeled --output $(TRANSFER_DIR)/finetune-random \
	  $(CPU_FLAGS)
	$(FP) eval --checkpoint $(TRANSFER_DIR)/finetune --data $(TRANSFER_DIR)/labeled $(CPU_FLAGS)

# No GPU here: Triton kernels run under the interpreter, which must be set before triton is imported.
test: setup
	TRITON_INTERPRET=$${TRITON_INTERPRET-1} $(PY) -m pytest tests -q --durations=15; rc=$$?; \
	if [ $$rc = 5 ]; then echo "no tests collected"; exit 1; fi; exit $$rc

# Ours beside its baseline in one run; the table of ratios ends the output (bench/conftest.py).
bench: setup
	mkdir -p $(dir $(BENCH_JSON))
	$(PY) -m pytest bench/ --benchmark-only -q --benchmark-json=$(BENCH_JSON)
	$(PY) bench/summarize.py $(BENCH_JSON) --readme

# Fewer rounds and only the smaller cases (--short), failing with a GATE FAIL line per ratio under its floor in
# bench/baselines.json, or per gated benchmark that did not run (--gate).
bench-gate: setup
	$(PY) -m pytest bench/ --benchmark-only -q --short --gate

clean:
	rm -rf $(VENV) runs .pytest_cache .benchmarks
