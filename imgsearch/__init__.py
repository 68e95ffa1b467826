"""imgsearch: an image-retrieval lifecycle. The library is pure: it never talks to a tracker."""

__version__ = "0.1.0"
