import os

# Two cores: keep every library's thread pool small so tests don't thrash each other.
os.environ.setdefault("OMP_NUM_THREADS", "1")
