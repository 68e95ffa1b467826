"""The FAISS index (factory, build, measure, publish) and ranking."""
