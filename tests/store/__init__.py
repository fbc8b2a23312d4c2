"""Tests of `store`: the API, crash safety, read-only stores, the results read model, and the commands that read it."""
