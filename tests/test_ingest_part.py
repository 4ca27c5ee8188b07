"""pipeline.ingest.part without Ray or a server: img2dataset's raw shard -> the final shard."""
import json

import pandas as pd

from pipeline.ingest.part import finalize_shard
from pipeline.ingest.url_lists import MetadataFilters
from pipeline.shards import iter_samples, write_shard


def test_final_shard_is_in_input_order_whatever_order_the_downloads_finished(tmp_path):
    """img2dataset writes samples in the order its threads finish: the final tar and parquet are in
    key (= input) order, so the same URL list always gives the same bytes."""
    raw, out = tmp_path / "raw", tmp_path / "out"
    raw.mkdir(), out.mkdir()
    finished = ["000000003", "000000000", "000000004", "000000001", "000000002"]  # completion order
    meta = {key: {"sha256": f"hash{key}", "original_width": 64, "original_height": 64} for key in finished}
    rows = pd.DataFrame({"key": finished, "status": ["success"] * 4 + ["failed_to_download"],
                         "error_message": [None] * 4 + ["HTTP Error 404: Not Found"]})
    rows.to_parquet(raw / "00000.parquet")
    write_shard(raw / "00000.tar", [{"__key__": key, "jpg": key.encode(), "json": json.dumps(meta[key]).encode()}
                                    for key in finished[:4]])
    stats = finalize_shard(raw, 0, out, 7, MetadataFilters(), claim=None)
    assert stats["successes"] == 4
    assert [s["__key__"] for s in iter_samples(out / "00007.tar")] == ["000000000", "000000001", "000000003",
                                                                        "000000004"]
    final = pd.read_parquet(out / "00007.parquet")
    assert list(final["key"]) == sorted(finished)
    assert final.set_index("key").loc["000000002", "status"] == "failed_to_download"
