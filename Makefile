# Entry points a new user needs. Each installs what it uses, so it works on a fresh machine.
#
# Everything installs into one environment and never into another: the active virtual environment
# or conda environment when make runs inside one (conda's base excepted: that is the
# distribution's own), else a project venv in .venv (made by scripts/make_venv.sh, which also
# copes with a Debian/Ubuntu python3 that lacks the venv module). VENV=DIR chooses another.
ifdef VIRTUAL_ENV
  VENV ?= $(VIRTUAL_ENV)
else ifneq ($(filter-out base,$(CONDA_DEFAULT_ENV)),)
  VENV ?= $(CONDA_PREFIX)
endif
VENV ?= .venv
PYTHON := $(VENV)/bin/python
# torch first and pinned together with torchvision: these two import together here
# (a lone torch wheel can pull a torchvision whose ops do not match).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
# In the environment, not the work tree: a different VENV installs again.
STAMP := $(VENV)/.ldm-pipeline.stamp
# The environment's bin first, as activation would: child processes (torchrun, sbatch scripts,
# Ray workers) that run `python` get this environment's.
RUN := PATH="$(abspath $(VENV))/bin:$$PATH" HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 \
  WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0

.PHONY: install install-slurm demo test bench-cpu

$(PYTHON):
	scripts/make_venv.sh $(VENV)

$(STAMP): pyproject.toml Makefile | $(PYTHON)
	$(PYTHON) -m pip install --quiet $(TORCH_PINS)
	$(PYTHON) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The slurm tests start a real one-node cluster; this installs its Debian packages (or says why not).
install-slurm:
	scripts/install_slurm.sh

# The embedded demo on CPU: prints a line per stage, last the JSON of its headline figures.
demo: install
	$(RUN) $(PYTHON) -m jobs.demo

# The whole CPU suite; GPU tests skip themselves without CUDA. Two pytest-xdist workers, each
# taking whole files (module fixtures such as a SLURM cluster start once per file), the files that
# start Ray clusters all on one worker (tests/conftest.py, RAY_FILES): most tests run one thread or
# wait on a subprocess's start, so two at a time use 2 cores better than one (measured 15.3 against
# 18.7 minutes on 2 cores). TEST_WORKERS=0 runs them in this process. --durations: the slowest
# tests in every CI log, to keep the suite inside its time.
TEST_WORKERS ?= 2
test: install install-slurm
	$(RUN) $(PYTHON) -m pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=30

bench-cpu: install
	$(RUN) $(PYTHON) bench/unet_step.py
