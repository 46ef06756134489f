"""The trainer's parts that train.py composes: config, device set-up, optimisation, checkpoints, logs."""
