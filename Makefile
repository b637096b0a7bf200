# ds01: the two commands are `make run` and `make test`; both install what is missing.
SHELL := /bin/bash
CONFIG_DIR ?= /etc/ds01

.PHONY: setup run test lint protos install uninstall
ROOT ?= /
PREFIX ?= /opt/ds01

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

# ds01 for every user of this host: a virtual environment from the distribution's
# Python (world-readable, never a user's pyenv), then `ds01 admin install` (systemd units,
# /etc/ds01, ds01 and ds01d on every PATH, the Docker socket takeover). Run as root.
install: setup
	@[ -x $(ROOT)$(PREFIX)/bin/python3 ] || /usr/bin/python3 -m venv $(ROOT)$(PREFIX)
	@$(ROOT)$(PREFIX)/bin/pip install -q --disable-pip-version-check -c constraints.txt .
	@chmod -R a+rX $(ROOT)$(PREFIX)
	@$(ROOT)$(PREFIX)/bin/ds01 admin install --root $(ROOT) --prefix $(PREFIX) \
	    --config-dir $(CURDIR)/config $(INSTALL_FLAGS)

uninstall:
	@$(ROOT)$(PREFIX)/bin/ds01 admin install --uninstall --root $(ROOT) --prefix $(PREFIX)
	@rm -rf $(ROOT)$(PREFIX)

test: setup
	@scripts/test.sh

lint: setup
	.venv/bin/ruff check .
	.venv/bin/ruff format --check .

protos: setup
	scripts/gen-protos.sh
