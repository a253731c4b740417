"""Mechanism analyses of study A: exact per-patch gradients (H3), tail location (H1),
top-k dilution (H4), latent calibration (H7), their figures and the markdown report.

  gradients.py   per-patch gradient norms in input and parameter space, Gini
  hypotheses.py  H1/H4/H7 statistics, sweep results, verdict rules (written once)
  figures.py     the report's figures
  report.py      ``analyze_run(workdir)``: everything above for a finished run
"""
