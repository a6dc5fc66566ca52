"""deephash: Siamese/triplet embeddings with online mining, and deep binary hashing for retrieval."""

__version__ = "0.1.0"
