"""Optuna search over the training function, with the space declared in params.yaml."""
