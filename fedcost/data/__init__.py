"""Data: the mapping of source files into the schema, and the synthetic ecosystem."""
