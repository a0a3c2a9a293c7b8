"""The benchmarks, installed as ``distgrad.bench`` so that ``distgrad bench`` runs them from
any installation (``python -m distgrad.bench.allreduce`` works too; so does
``python bench/allreduce.py`` in a checkout)."""
