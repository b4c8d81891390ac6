import sys
from pathlib import Path

# the harvest/corpus writers of the dictionary tests (`dictionary_shards`) serve these tests too
sys.path.insert(0, str(Path(__file__).parents[1] / "dictionaries"))
