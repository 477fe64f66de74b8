"""Hyperparameter search: one W&B sweep file (``configs/sweep.yaml``) for ``wandb agent``
online and for ``cvgen tune`` offline on Optuna (:mod:`cvgen.tune.run`)."""
