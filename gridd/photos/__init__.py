"""The photos job type: resizing, metadata, the object store and the SQL catalog of photos."""
