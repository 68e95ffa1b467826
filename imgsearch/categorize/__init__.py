"""Categorise and label collections: keywords for every image, named clusters, a gallery."""
