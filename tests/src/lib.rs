//! Harness shared by the end-to-end tests: temporary directories and the built binaries.
