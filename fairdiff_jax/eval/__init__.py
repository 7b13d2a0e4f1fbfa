"""Measuring image sets: bias metrics, annotated grids, the evaluation of generated folders and the
original-vs-debiased comparison."""
