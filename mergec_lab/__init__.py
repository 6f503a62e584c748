"""What mergec's demo, examples, tests and benchmarks use beside the library: a small model zoo
(``zoo``), offline datasets (``datasets``), training and evaluation helpers with a checkpoint
cache (``training``) and the digits demo (``demo``). Merging needs none of it; it installs with
the ``lab`` extra (``pip install 'mergec[lab]'``).
"""
