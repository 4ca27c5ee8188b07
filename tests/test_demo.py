"""The embedded demo end to end at a reduced size (same stages, fewer images and steps)."""
import json

import pytest

from jobs import demo

pytestmark = pytest.mark.slow


def test_demo_runs_every_stage_and_reports_its_figures(tmp_path, capsys):
    demo.main(["--out", str(tmp_path), "--num-images", "144", "--steps", "40", "--batch", "32",
               "--num-samples", "24", "--sample-steps", "10"])
    lines = capsys.readouterr().out.strip().splitlines()
    headline = json.loads(lines[-1])  # the last line is the JSON of headline figures
    for stage in ("generate", "ingest", "train", "evaluate"):
        assert any(line.startswith(f"[demo] {stage}") for line in lines), stage
    for key in ("caption_adherence_guided", "caption_adherence_unguided", "caption_adherence_unconditional"):
        assert 0.0 <= headline[key] <= 1.0
    assert headline["ingest"]["downloaded"] == 144 and headline["ingest"]["shards"] == 3  # parts of 64
    assert headline["loss_last"] < headline["loss_first"]
    assert json.loads((tmp_path / "metrics.json").read_text()) == headline
    assert (tmp_path / "samples_guided.png").stat().st_size > 0
