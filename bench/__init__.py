"""The benchmarks: run them as scripts (python bench/loader_fps.py); see bench/README.md."""
