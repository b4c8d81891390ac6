import sys
from pathlib import Path

# the word-level tokenizer of the task tests serves the contrast-file test
sys.path.insert(0, str(Path(__file__).parents[1] / "tasks"))
