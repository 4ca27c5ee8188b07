"""`python -m jobs.evaluate` and `jobs.fid_stats`: Inception features and sample-quality metrics."""
