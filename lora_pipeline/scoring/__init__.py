"""Batch scoring on Spark (`steps/batch_score.py`): the model to score with (`model`), the Spark session
(`spark`), and reading, checking and atomically writing tables (`table`)."""
