"""Embedding drift."""
