"""The passes of the mergec pipeline."""
