"""FastAPI service that scores images with exported detector artifacts (``uvicorn api.app:app``).

Depends only on ``oodforge``: every detector kind loads through ``oodforge.detector.Detector.load``.
"""
