"""Quality: agreement of a backend with torch (compare.py), passkey retrieval (passkey.py), perplexity on text
(perplexity.py)."""
