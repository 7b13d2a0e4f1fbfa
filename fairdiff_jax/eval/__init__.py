"""Measuring image sets with one evaluator (evaluator.py): faces and attributes (face_analysis), bias (bias),
fidelity (fidelity), prompt consistency (consistency), CLIP-I / DINO (similarity); folders and their cache
(folders), tables, grids; the evaluation of generated folders (evaluate, cli), training's periodic evaluation
(periodic), the original-vs-debiased comparison (before_after); ruined image sets (ruins)."""
