"""Training: one loop (loop.py), and the objectives it runs: passkey retrieval (passkey.py, its rows and
losses) and continual language-model training on long text (lm.py)."""
