# The two commands of the README.
.PHONY: demo test bench
demo:
	./scripts/setup.sh && .venv/bin/liveindex demo
test:
	./scripts/setup.sh && .venv/bin/python -m pytest
bench:
	.venv/bin/python benchmarks/pipeline_throughput.py
