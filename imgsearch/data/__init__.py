"""Catalog data: ingest, image I/O, validate, preprocess, split, watermark, EDA."""
