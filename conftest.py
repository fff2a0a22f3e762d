# Its presence puts the repository root on sys.path, so that `pytest` finds models/ and utils/.
# The evaluation scripts named test_*.py are not test files.
collect_ignore = ["test_comparison.py", "test_detection.py", "test_mixup_inference.py"]
