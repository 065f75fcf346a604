# cyber-moe: `make run` and `make test` do all set-up on a fresh machine (Python 3.11 + Debian).
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp
PARAMS ?= params/default.yaml
APT_UPDATED := $(VENV)/.apt-updated

.PHONY: install run test lint check-clean check-export nbtest pytest lab serve dashboard bench clean-outputs sysdeps-test sysdeps-lab

# (Re)install when pyproject.toml changes; the venv itself is created once.
$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11" >&2; exit 1; }
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[serve,lab,research,dev]'
	touch $(STAMP)

install: $(STAMP)

run: install sysdeps-lab
	$(BIN)/cyber-moe pipeline --params $(PARAMS)

# Debian packages that the integration tests start for real (installed only when missing).
sysdeps-test:
	@missing=""; \
	[ -x /usr/lib/postgresql/15/bin/initdb ] || missing="$$missing postgresql"; \
	command -v chromium >/dev/null || missing="$$missing chromium"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# Debian packages of the traffic lab (cyber_moe.lab), installed only when missing and only as root (without root the
# lab is unavailable anyway and the run falls back to the simulator). policy-rc.d keeps the packages' own services
# (nginx, sshd, vsftpd) from starting on the host: the lab starts its own, inside namespaces, with its own configs.
LAB_PROGRAMS := ip:iproute2 tcpdump:tcpdump nginx:nginx-light sshd:openssh-server ssh:openssh-client vsftpd:vsftpd \
	dnsmasq:dnsmasq-base curl:curl dig:dnsutils ss:iproute2 nmap:nmap masscan:masscan hping3:hping3 \
	slowhttptest:slowhttptest goldeneye:goldeneye hydra:hydra medusa:medusa ncrack:ncrack sqlmap:sqlmap
sysdeps-lab:
	@if [ "$$(id -u)" != 0 ]; then echo "sysdeps-lab: not root, skipping the lab's Debian packages (the lab needs root anyway)"; exit 0; fi; \
	missing=""; \
	for pair in $(LAB_PROGRAMS); do prog=$${pair%%:*}; pkg=$${pair##*:}; \
	  PATH="$$PATH:/usr/sbin:/sbin" command -v $$prog >/dev/null || missing="$$missing $$pkg"; done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages for the lab:$$missing"; \
	  made_policy=""; if [ ! -e /usr/sbin/policy-rc.d ]; then printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; made_policy=1; fi; \
	  rc=0; apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing >/dev/null || rc=$$?; \
	  if [ -n "$$made_policy" ]; then rm -f /usr/sbin/policy-rc.d; fi; \
	  exit $$rc; \
	fi

# nbdev_clean must leave the notebooks as committed.
check-clean: install
	@tmp=$$(mktemp -d); cp -r nbs "$$tmp/nbs"; $(BIN)/nbdev_clean; \
	if ! diff -r -q "$$tmp/nbs" nbs; then echo "error: nbdev_clean changed the notebooks above: run it and commit" >&2; rm -rf "$$tmp"; exit 1; fi; rm -rf "$$tmp"

# nbdev_export must leave cyber_moe/ as committed: notebooks and package in sync.
check-export: install
	@tmp=$$(mktemp -d); cp -r cyber_moe "$$tmp/pkg"; $(BIN)/nbdev_export; \
	if ! diff -r -q -x __pycache__ "$$tmp/pkg" cyber_moe; then echo "error: cyber_moe/ differs from what nbdev_export makes of nbs/: export and commit" >&2; rm -rf "$$tmp"; exit 1; fi; rm -rf "$$tmp"

nbtest: install
	$(BIN)/nbdev_test --n_workers 2

pytest: install sysdeps-test sysdeps-lab
	$(BIN)/pytest tests/

# ruff: lint the notebooks, the package and the scripts around it; format-check the sources (cyber_moe/ is generated
# from nbs/: format there with `ruff format nbs && nbdev_export && nbdev_clean`).
RUFF_FORMAT ?= nbs app tests benchmarks
lint: install
	$(BIN)/ruff check cyber_moe nbs app tests benchmarks
	$(BIN)/ruff format --check $(RUFF_FORMAT)

test: lint check-clean check-export nbtest pytest

lab: install
	$(BIN)/jupyter lab --notebook-dir=nbs

serve: install
	$(BIN)/cyber-moe serve --model outputs/default/model

dashboard: install
	$(BIN)/cyber-moe dashboard

bench: install
	@for b in benchmarks/bench_*.py benchmarks/serve.py; do echo "== $$b"; $(BIN)/python "$$b"; done

clean-outputs:
	rm -rf outputs
