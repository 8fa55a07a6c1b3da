"""Improve: training data from stored runs (`data`), the content split and leak check (`leak`), fine-tuning
(`trainer`, behind the optional `train` extra) and the closed loop (`loop`).

Importing this package imports nothing heavy: torch, TRL and PEFT load only when a model is trained.
"""
