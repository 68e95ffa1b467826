"""Batch embedding (reader -> mapper -> writer, runners) and the query path."""
