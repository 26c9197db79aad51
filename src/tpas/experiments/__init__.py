"""The results page: `python -m tpas.experiments.results` regenerates docs/results.md and its pictures.

results   the stages (data, train, infer, tune, post) and the report built from their files
figures   the Table-3 plot and the Figure-2 ranked lists (PNG and HTML)
"""
