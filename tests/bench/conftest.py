"""The benchmark's arithmetic and outputs (the real run is make bench).

Fixtures only; what they are built from lives in tests/helpers/."""
