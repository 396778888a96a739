"""Feature extractors for the metrics (``metrics.extractor._target_=...``) beyond the standard Inception."""
