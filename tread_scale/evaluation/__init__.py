"""Evaluation: Inception features, FID / sFID / IS / precision-recall, distributed sample generation."""
