"""Improve: training data from stored runs (`data`), fine-tuning (`trainer`, behind the optional `train`
extra) and the closed loop (`loop`). The content split and leak check they rest on are in selfcorrect.split.

Importing this package imports nothing heavy: torch, TRL and PEFT load only when a model is trained.
"""
