"""Small programs the shared-kit tests run in a subprocess (``python -m tests.shared.programs.NAME``)."""
