"""The photos pipeline: resizing and metadata (images), the ``photos`` job type, its object store and catalog."""
