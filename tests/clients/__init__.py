"""Drivers for official platform clients used by the transparency tests."""
