# ds01: the two commands are `make run` and `make test`; both install what is missing.
SHELL := /bin/bash
CONFIG_DIR ?= /etc/ds01

.PHONY: setup run test lint protos

setup:
	@scripts/setup.sh

# The local default: PKI, etcd, a private dockerd (unless Docker answers) and all four
# services in one process, on loopback. Ctrl-C stops everything.
run: setup
	@install -d -m 0755 $(CONFIG_DIR)
	@for f in ds01.yaml resource-limits.yaml inventory.yaml; do \
	    [ -e $(CONFIG_DIR)/$$f ] || { install -m 0644 config/$$f $(CONFIG_DIR)/$$f && echo "installed $(CONFIG_DIR)/$$f"; }; \
	done
	@exec .venv/bin/ds01d --config $(CONFIG_DIR)/ds01.yaml --local --services all

test: setup
	@scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

protos: setup
	scripts/gen-protos.sh
