"""moe-plot: charts of moe-perf JSON Lines rows (scripts/moe-plot; docs/moe-perf.md, "Charts: moe-plot")."""
