"""Model and weight file formats."""
