"""The report: the paper's tables and figures from runs' workdirs (`python -m
experiments.report`).

`runs` reads workdirs through the results schema (`experiments.results`), `paper` holds
the paper's numbers, `tables` and `figures` make Table 1, Table 2 and Figs. 3, 7 and 8,
`document` writes REPORT.md.
"""
