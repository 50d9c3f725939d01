"""Training and sampling pipelines assembled from difforge.nn, difforge.models and difforge.data."""
