"""Clustering pieces every layer may import: k-means, kNN and the prototype memory."""
