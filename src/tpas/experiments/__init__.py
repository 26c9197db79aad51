"""Experiments: the results page (`python -m tpas.experiments.results` regenerates docs/results.md
and its pictures) and the demo-quality measurements of issue 13 (docs/demo-quality.md).

results     the stages (data, train, infer, tune, post) and the report built from their files
figures     the Table-3 plot and the Figure-2 ranked lists (PNG and HTML)
post_gain   Table 4 for any run: each post-processing method tuned on val, measured on test
attributes  demo only: the attribute ceiling of the test set and which stated attributes a run misses
probe       demo only: how well a locked image tower's features read each rendered attribute
"""
