"""`baton bench`: a load generator for any OpenAI-compatible server, with SLO goodput.

    baton bench --url http://127.0.0.1:8000 --workload mixed --rate 0.5 1 2
    baton bench compare --arms baton-disagg baton-agg vllm-cpu --rate 1 2 4 inf

| module | job |
|---|---|
| `workloads.py` | seeded sessions of turns with exact token lengths (random, shared-prefix, mixed, shift, agent) |
| `client.py` | one streamed /v1/completions request, timed chunk by chunk |
| `load.py` | open-loop (Poisson / gamma) or closed-loop arrivals, time bound, warm-up, sweeps |
| `metrics.py` | TTFT / TPOT / ITL / E2E percentiles, throughput, goodput over every sent request |
| `report.py` | Markdown table, results.json with every request, PNG plots |
| `arms.py` | the systems `compare` starts, probes and stops, one after another |
| `cli.py`, `runner.py` | the flags (argparse only, so `baton up` stays light), and the glue |
"""
