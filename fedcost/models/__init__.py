"""Torch models, local training and evaluation metrics for the readmission and cost tasks."""
