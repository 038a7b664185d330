# make demo: set up (once) and run the GSD demo on the bundled models.
# make test: set up (once) and run the whole test suite (slow tests included).
PY := .venv/bin/python
STAMP := .venv/.vllm-gsd-setup

.PHONY: setup demo test test-fast
setup: $(STAMP)
$(STAMP): pyproject.toml scripts/setup_env.sh scripts/prepare_models.py
	bash scripts/setup_env.sh
	touch $@

demo: setup
	$(PY) scripts/demo.py

test: setup
	$(PY) -m pytest -q -rs --durations=15

test-fast: setup
	$(PY) -m pytest -q -m "not slow"
