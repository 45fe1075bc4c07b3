"""Data sources, image loading, caption cleaning and the synthetic data set."""
