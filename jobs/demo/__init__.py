"""`python -m jobs.demo`: the pipeline end to end on synthetic scenes, and its report."""
