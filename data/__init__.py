"""Data pipeline: user files -> tokenised samples -> batches (see docs/data.md and
docs/design.md section 2)."""
