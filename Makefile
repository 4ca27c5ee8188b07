# Entry points a new user needs. Each installs what it uses, so it works on a fresh machine.
PYTHON ?= python3
PIP := $(PYTHON) -m pip
# torch first and pinned together with torchvision: these two import together here
# (a lone torch wheel can pull a torchvision whose ops do not match).
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
STAMP := .install.stamp

.PHONY: install install-slurm demo test bench-cpu

$(STAMP): pyproject.toml Makefile
	$(PIP) install --quiet $(TORCH_PINS)
	$(PIP) install --quiet -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The slurm tests start a real one-node cluster; this installs its Debian packages (or says why not).
install-slurm:
	scripts/install_slurm.sh

# The embedded demo on CPU: prints a line per stage, last the JSON of its headline figures.
demo: install
	HF_HUB_OFFLINE=1 $(PYTHON) -m jobs.demo

# The whole CPU suite; GPU tests skip themselves without CUDA.
test: install install-slurm
	HF_HUB_OFFLINE=1 NO_ALBUMENTATIONS_UPDATE=1 WANDB_MODE=offline RAY_USAGE_STATS_ENABLED=0 \
	  $(PYTHON) -m pytest -q

bench-cpu: install
	$(PYTHON) bench/unet_step.py
