# splitnet: make test | make bench | make reproduce
#
# On a fresh machine the first target creates .venv and installs the CPU build of torch
# (torch==2.13.0, a local wheel; never a multi-GB CUDA build) plus the package in editable mode.
# Where a python3 that already has every module in DEPS is present (a GPU box with torch
# preinstalled and no network), the check below finds it (or set NO_INSTALL=1): nothing is
# installed and the sources run from src/ via PYTHONPATH. After `make test`, the `splitnet`
# command is .venv/bin/splitnet (or: PYTHONPATH=src python3 -m splitnet).

SYS_PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
OUT ?= runs/reproduce

# Every third-party module the commands import: without tqdm or matplotlib a run would fail only at
# its first progress bar or, worse, at the figures after a 10-minute `reproduce`. find_spec, not
# import: the check runs on every make call and importing torch takes seconds.
DEPS := torch numpy PIL pytest tqdm matplotlib
MISSING_DEPS := $(or $(shell $(SYS_PYTHON) -c "import sys, importlib.util as u; \
	print(' '.join(m for m in sys.argv[1:] if u.find_spec(m) is None) or '-')" $(DEPS) 2>/dev/null),\
	everything (it does not run))
HAVE_DEPS := $(if $(filter -,$(MISSING_DEPS)),1,)

ifeq ($(HAVE_DEPS),1)
else ifeq ($(NO_INSTALL),1)
DEPS_ERROR := NO_INSTALL=1, but $(SYS_PYTHON) lacks: $(MISSING_DEPS) (install them, or drop NO_INSTALL to build $(VENV))
else ifeq ($(wildcard $(VENV)/.installed),)
$(info make: $(SYS_PYTHON) lacks $(MISSING_DEPS); installing everything into $(VENV) (NO_INSTALL=1 refuses))
endif

ifeq ($(HAVE_DEPS),1)
PYTHON := PYTHONPATH=$(CURDIR)/src $(SYS_PYTHON)
ENV_STAMP :=
else ifeq ($(NO_INSTALL),1)
PYTHON := PYTHONPATH=$(CURDIR)/src $(SYS_PYTHON)
ENV_STAMP := deps-missing
else
PYTHON := $(VENV)/bin/python
ENV_STAMP := $(VENV)/.installed
endif

.PHONY: env test bench reproduce ablations cifar clean deps-missing

env: $(ENV_STAMP)

# Before any command runs, not at its first progress bar or its figures.
deps-missing:
	@echo "make: $(DEPS_ERROR)" >&2; exit 2

$(VENV)/.installed: setup.cfg pyproject.toml
	$(SYS_PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/python -c "import torch" 2>/dev/null || $(VENV)/bin/pip install -q $(TORCH_SPEC)
	$(VENV)/bin/pip install -q -e ".[test]"
	touch $@

# Two pytest processes at once (tests/shards.py: the suite waits on subprocesses that import torch,
# so one process keeps 2 cores about 1.3 busy); TEST_JOBS=1 for one plain pytest run.
TEST_JOBS ?= 2
test: $(ENV_STAMP)
	$(PYTHON) tests/shards.py --jobs $(TEST_JOBS)

bench: $(ENV_STAMP)
	$(PYTHON) -m splitnet bench --out runs/bench.json

# make reproduce [OUT=runs/reproduce] [DATA=/path/to/imagenet]: the paper's pipeline end to end.
reproduce: $(ENV_STAMP)
	$(PYTHON) -m splitnet reproduce --out $(OUT) $(if $(DATA),--data $(DATA),)

# make ablations [ABL_OUT=runs/ablations] [DATA=...] [SEEDS=1]: every experiment in experiments/ablations/.
ABL_OUT ?= runs/ablations
SEEDS ?= 1
ablations: $(ENV_STAMP)
	$(PYTHON) -m splitnet ablate --out $(ABL_OUT) --seeds $(SEEDS) $(if $(DATA),--data $(DATA),)

# make cifar DATA=/path/to/cifar-10-python.tar.gz [CIFAR_OUT=runs/cifar] [CIFAR_SEEDS=2] [JOBS=2]:
# the ablations at CIFAR-10 scale (experiments/cifar.toml) and Figure 1 on the full training set.
CIFAR_OUT ?= runs/cifar
CIFAR_SEEDS ?= 2
JOBS ?= 2
cifar: $(ENV_STAMP)
	@test -n "$(DATA)" || { echo "make cifar: set DATA=/path/to/cifar-10-python.tar.gz (or a folder train/<class>/*, val/<class>/*)" >&2; exit 2; }
	$(PYTHON) -m splitnet ablate --suite cifar --data $(DATA) --out $(CIFAR_OUT) --seeds $(CIFAR_SEEDS) --jobs $(JOBS)

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
