# `make demo` and `make test` work on a fresh machine: they create .venv, install, then run.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# torch/torchvision pins: the builds this project is tested with (pip takes them from a local
# wheel cache when there is one).
TORCH_PINS ?= torch==2.14.1 torchvision==0.29.1
export YOLO_OFFLINE := 1
export YOLO_CONFIG_DIR := $(CURDIR)/.ultralytics

.PHONY: install demo test test-fast test-slow lint bench gpu-wheels clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/yolo-resume train

# Both the fast suite and the slow (-m slow) integration suite; `make test-fast` for the quick loop.
# pytest-xdist runs TEST_WORKERS test files at once: most tests wait on training subprocesses, so two
# workers on two cores ran the fast suite in 7:21 against 13:04 for one (separate runs). `--dist loadfile`
# keeps each file's module-scoped fixtures (an S3 server, a reference run) in one worker; the session's
# reference run is trained once and shared (tests/conftest.py `built_once`). TEST_WORKERS=0: one process.
TEST_WORKERS ?= 2
PYTEST := $(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

test: $(STAMP)
	$(PYTEST)
	$(PYTEST) -m slow

test-fast: $(STAMP)
	$(PYTEST)

test-slow: $(STAMP)
	$(PYTEST) -m slow

# Quick mode (about 40 minutes on 2 cores): training throughput, memory, checkpoint cost, resume latency, the
# dataset index and the data pipeline, and accuracy over 4 seeds vs the ultralytics trainer, plus the checkpoint
# micro-benchmark; see BENCHMARKS.md.
bench: $(STAMP)
	$(PY) scripts/bench_all.py

# The cp312 manylinux wheels the GPU machine lacks (ultralytics and the deps it does not have, pycocotools),
# at the versions this venv tests with, into gpu-wheels/ (ignored; at most 64 MiB with the tree) for
# scripts/gpu_check.py, which installs them there without touching its torch. Needs network (PyPI).
gpu-wheels: $(STAMP)
	$(PY) scripts/gpu_check.py --download-wheels gpu-wheels

lint: $(STAMP)
	$(VENV)/bin/ruff check yolo_resume tests scripts

clean:
	rm -rf runs datasets/demo .ultralytics
