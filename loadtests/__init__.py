"""Load tests and benchmarks: locust users (locustfile.py, run.py, report.py), the benchmark against
plain vLLM (bench.py, servers.py) and shared prompt/request helpers (workload.py). See docs/benchmarks.md."""
