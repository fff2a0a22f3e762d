# Its presence puts the repository root on sys.path, so that `pytest` finds models/ and utils/.
# The stage scripts named test_*.py are not test files: test_mixup_inference.py shares its basename with
# tests/test_mixup_inference.py, which pytest cannot collect twice.
collect_ignore = ["test_comparison.py", "test_mixup_inference.py"]
