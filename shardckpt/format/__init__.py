"""The bytes on disk (FORMAT.md) and how to open them as untrusted input."""
