"""Evaluation: metrics with confidence intervals, temperature calibration and the plots that show them."""
