"""Categorise and label collections: keywords for every image (and, later, named clusters)."""
