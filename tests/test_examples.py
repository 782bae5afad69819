"""Each example runs end to end in its tiny setting, so none can rot (no accuracy asserted: a few
steps train nothing)."""
import importlib
import math
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


@pytest.mark.parametrize("name", ["slot_filling", "sentiment", "translation", "generation", "keyword_spotting",
                                  "language_model"])
def test_example_tiny(name, capsys):
    result = importlib.import_module(name).main(["--tiny"])
    values = result.values() if isinstance(result, dict) else [result]
    assert all(math.isnan(v) or 0.0 <= v <= 1.0 for v in values)
    assert "accura" in capsys.readouterr().out
