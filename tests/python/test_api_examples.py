"""The examples of python/API.md run as written (with the small test corpus and the repository's golden set),
so the document stays true; the values they print are checked by the other python.* tests."""
import contextlib
import io
import os
import re
import unittest

from moelab_testing import GOLDEN_DIR, SOURCE_DIR, small_corpus


class Examples(unittest.TestCase):
    def test_examples_run(self):
        with open(os.path.join(SOURCE_DIR, "python", "API.md")) as f:
            text = f.read()
        blocks = re.findall(r"```python\n(.*?)```", text[text.index("## Examples"):], re.S)
        self.assertGreaterEqual(len(blocks), 3)
        code = "\n".join(blocks).replace('"data/corpus"', repr(small_corpus())).replace('"golden"', repr(GOLDEN_DIR))
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "API.md examples", "exec"), {})
        self.assertIn("router_logits", out.getvalue())


if __name__ == "__main__":
    unittest.main()
