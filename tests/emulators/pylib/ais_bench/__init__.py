"""Emulated `ais_bench` (test only): `python3 -m ais_bench --model x.om --input dir --output out`."""
