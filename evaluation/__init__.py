"""Evaluation: Fréchet distances (FVD), CLIP score, reconstruction metrics, scaling laws."""
