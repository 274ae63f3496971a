# The two commands of the README.
.PHONY: demo test test-slow bench
demo:
	./scripts/setup.sh && .venv/bin/liveindex demo
test:
	./scripts/setup.sh && .venv/bin/python -m pytest
test-slow:
	./scripts/setup.sh && .venv/bin/python -m pytest -m slow
bench:
	.venv/bin/python benchmarks/pipeline_throughput.py
