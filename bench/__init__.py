"""The bench: step time, profiles and the GPU check of the two twins (docs/bench.md).

Its tools run as scripts (`python bench/compare.py ...`); their shared modules import as `bench.<module>`
(the checkout is on sys.path through `pip install -e .`, or PYTHONPATH).
"""
