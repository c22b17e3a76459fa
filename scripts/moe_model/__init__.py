"""scripts/moe-model: the scale-out performance model (issue 14, item 6). Modules, bottom up:

traffic.py  record sizes and the bytes a token puts on RDMA and NVLink (HT rails + forwarding, LL per-rank messages)
routing.py  routing statistics: exact for uniform top-k, Monte Carlo for DeepEP's group-limited test routing
rates.py    measured intranode inputs read from committed moe-perf rows (perf/results/*.jsonl)
predict.py  the named parameters, the time model per case, DeepEP's published figures and the issue's targets
cli.py      command line, Markdown and JSON output
"""
