"""difforge-bench: difforge's ops against the baselines installed here (torch eager, torch.compile, Liger…).

Entry point: ``difforge_bench.cli:main`` (console script ``difforge-bench``, or ``python -m difforge_bench``).
Families of cases live in ``difforge_bench.families``; results from GPU runs go under ``bench/results/``.
"""
