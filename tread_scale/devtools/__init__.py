"""Local tooling for the demo and the tests: an S3-compatible server on 127.0.0.1, the demo job."""
