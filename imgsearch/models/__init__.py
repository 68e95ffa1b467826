"""Image backbones (each with its preprocessing and block layout) and heads."""
