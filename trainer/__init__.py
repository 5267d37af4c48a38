"""Training, evaluation and export of OOD detectors (entry point: ``trainer/train_oal.py``)."""
