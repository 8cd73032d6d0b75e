"""Load tests for chatq: the same streaming workload against chatq, vLLM's own server
and chatq with the synthetic engine, one target at a time; tables, JSON and a chart.

Run ``python -m loadtest --help``; see loadtest/README.md.
"""
