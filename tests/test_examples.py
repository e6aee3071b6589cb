"""The examples run as a user would run them: a fresh interpreter, from another directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def test_quickstart(tmp_path):
    out = tmp_path / "acts"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "HF_DATASETS_CACHE": str(tmp_path / "hf-cache")}  # keep load_dataset's cache here
    result = subprocess.run([sys.executable, os.path.join(EXAMPLES, "quickstart.py"), str(out)],
                            capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    text = result.stdout
    assert "6 encoder blocks, e.g. encoder.layer.0 -> (1, " in text
    rows = re.search(r"captured 100 documents: encoder\.layer\.2 \(d=384\): ([\d,]+) rows, "
                     r"encoder\.layer\.5 \(d=384\): \1 rows", text)
    assert rows, text
    assert f"cs.load: {rows.group(1)} rows; a batch of 256 -> vector (256, 384) torch.float32" in text
    assert "cs.stream: first shuffled batch (1024, 384)" in text
    assert len(re.findall(r"^  encoder\.layer\.[25] +'.+' +seen +\d+x  mean norm [\d.]+$", text, re.M)) == 6
    assert re.search(r"^longest document: #\d+, 128 tokens: ", text, re.M)
    # what it wrote is a complete, intact crowstream output
    import crowstream as cs

    assert cs.verify(str(out))["rows"] == 2 * int(rows.group(1).replace(",", ""))
    assert cs.info(str(out))["status"] == "complete"
