"""Retrieval metrics (one implementation) and feature quality."""
