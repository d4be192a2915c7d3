"""The hostile-input corpus: table-driven tests per entry point."""
