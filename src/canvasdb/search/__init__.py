"""Search: full text, typo tolerance, embeddings and hybrid ranking."""
