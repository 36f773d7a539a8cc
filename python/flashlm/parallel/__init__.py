"""Model parallelism: each scheme in its own module."""
