"""Factories for tests and benchmarks: tiny, randomly initialised models of the real checkpoint
families, written in the hub's folder layout. The runtime (``caig_ray`` outside this package,
``actors``, ``jobs``) never imports from here; a test that imports it proves the same
``from_pretrained`` code loads what users download."""
