"""The storage tests use the object-store fixtures of tests/conftest.py (moto S3, memory://)."""
