"""napari integration: the only place that imports napari or Qt."""
