"""Training: the corpus builder (corpus.py) and what the training loop reads (data.py)."""
