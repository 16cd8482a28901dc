"""The benchmark's arithmetic and outputs (the real run is make bench)."""
