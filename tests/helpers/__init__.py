"""Helpers shared by several test tiers and the benchmarks (never imported by the package)."""
