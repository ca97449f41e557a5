# The two commands a newcomer types: `make run` and `make test`. Both set everything up.
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: run test services lint fmt demo bench drills clean

$(STAMP): pyproject.toml scripts/bootstrap.sh
	@scripts/bootstrap.sh

## run: the real pipeline (simulators, one worker per queue, API, replayer, exporter) via honcho
run: $(STAMP)
	@scripts/services.sh redis
	@scripts/run.sh

## test: the whole suite against real Redis, RabbitMQ and a moto SQS server
test: $(STAMP)
	@scripts/services.sh redis rabbitmq
	@echo "test: ruff check ."
	@$(BIN)/ruff check .
	@echo "test: the suite on two workers (pytest -n 2 -m 'not serial')"
	@$(BIN)/pytest -n 2 -m "not serial" --durations=15 $(PYTEST_ARGS)
	@echo "test: the serial tests, one at a time (pytest -m serial)"
	@$(BIN)/pytest -m serial $(PYTEST_ARGS)

## demo: a two-minute storm on the real pipeline; report and charts in demo-out/ (DEMO_ARGS=...)
demo: $(STAMP)
	@scripts/services.sh redis
	@$(BIN)/tidegate demo --out demo-out $(DEMO_ARGS)

services: $(STAMP)
	@scripts/services.sh redis rabbitmq

lint: $(STAMP)
	@$(BIN)/ruff check .

fmt: $(STAMP)
	@$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache artifacts demo-out

## bench: every benchmark, ratios against same-run baselines, written to bench/RESULTS.md
bench: $(STAMP)
	@scripts/services.sh redis rabbitmq
	@$(BIN)/python bench/run_all.py

## drills: the fault drills, long (TIDEGATE_DRILL_SCALE=5: 10-minute soak); `make test` runs them short. See docs/drills.md
drills: $(STAMP)
	@scripts/services.sh redis rabbitmq
	@TIDEGATE_DRILL_SCALE=$${TIDEGATE_DRILL_SCALE:-5} $(BIN)/pytest -m drill -s $(PYTEST_ARGS)
