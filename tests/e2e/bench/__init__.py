"""The end-to-end benchmark behind `make bench` (entry point: tests/e2e/bench_vs_stock.py)."""
