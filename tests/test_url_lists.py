"""URL lists before any download: reading, column mapping, metadata filters, URL dedup."""
import pandas as pd
import pytest

from pipeline.ingest.url_lists import (
    MetadataFilters,
    Threshold,
    apply_filters,
    dedup_urls,
    normalise_url,
    read_url_lists,
)


def _frame(**columns):
    return pd.DataFrame(columns)


def test_reads_parquet_csv_jsonl_and_globs_with_column_mapping(tmp_path):
    rows = _frame(URL=["http://a/1.jpg", "http://a/2.jpg"], TEXT=["one", "two"], aesthetic=[5.0, 6.0])
    rows.to_parquet(tmp_path / "p1.parquet")
    rows.to_csv(tmp_path / "c.csv", index=False)
    rows.to_json(tmp_path / "j.jsonl", orient="records", lines=True)
    frame = read_url_lists([str(tmp_path / "*.parquet"), str(tmp_path / "c.csv"), str(tmp_path / "j.jsonl")],
                           url_col="URL", caption_col="TEXT")
    assert list(frame.columns) == ["url", "caption", "aesthetic"]
    assert len(frame) == 6 and frame["caption"].tolist() == ["one", "two"] * 3


def test_missing_columns_name_what_was_found_and_the_keys_to_set(tmp_path):
    _frame(link=["http://a/1.jpg"], text=["x"]).to_parquet(tmp_path / "u.parquet")
    with pytest.raises(ValueError, match=r"lacks column\(s\) \['url', 'caption'\]; found \['link', 'text'\]"
                                         r".*url_col=\.\.\. and caption_col=\.\.\."):
        read_url_lists([str(tmp_path / "u.parquet")], "url", "caption")


def test_unreadable_or_missing_inputs_are_named(tmp_path):
    bad = tmp_path / "broken.parquet"
    bad.write_bytes(b"not parquet at all")
    with pytest.raises(ValueError, match="cannot read URL list .*broken.parquet"):
        read_url_lists([str(bad)], "url", "caption")
    with pytest.raises(ValueError, match="matches no file"):
        read_url_lists([str(tmp_path / "none*.parquet")], "url", "caption")
    with pytest.raises(ValueError, match="unsupported extension"):
        read_url_lists([str(tmp_path / "list.txt")], "url", "caption")


def test_filters_count_every_drop_by_its_first_reason():
    frame = _frame(
        url=["http://a/0", None, "http://a/2", "http://a/3", "http://a/4", "http://a/5", "http://a/6", "http://a/7"],
        caption=["ok", "ok", "", "x" * 50, "ok", "ok", "ok", "ok"],
        width=[512, 512, 512, 512, 100, 2000, 512, 512],
        height=[512, 512, 512, 512, 512, 500, 512, 512],
        punsafe=[0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.9, None])
    filters = MetadataFilters(min_width=256, min_height=256, max_aspect_ratio=3.0, min_caption_chars=1,
                              max_caption_chars=40, thresholds={"punsafe": Threshold(max=0.5)})
    kept, dropped = apply_filters(frame, filters)
    assert kept["url"].tolist() == ["http://a/0"]
    assert dropped == {"missing_url": 1, "caption_too_short": 1, "caption_too_long": 1, "too_small": 1,
                       "aspect_ratio": 1, "punsafe_out_of_range": 2}


def test_threshold_on_a_missing_column_is_a_config_error():
    with pytest.raises(ValueError, match="filters.thresholds names column 'aesthetic'"):
        apply_filters(_frame(url=["u"], caption=["c"]), MetadataFilters(thresholds={"aesthetic": Threshold(min=5)}))


@pytest.mark.parametrize("a, b", [
    ("HTTP://Example.COM/a.jpg", "http://example.com/a.jpg"),
    ("http://example.com:80/a.jpg#frag", "http://example.com/a.jpg"),
    (" https://example.com:443/a.jpg?x=1 ", "https://example.com/a.jpg?x=1"),
])
def test_url_normalisation(a, b):
    assert normalise_url(a) == normalise_url(b)


def test_url_normalisation_keeps_what_changes_the_resource():
    assert normalise_url("http://e.com/a.jpg?x=1") != normalise_url("http://e.com/a.jpg?x=2")
    assert normalise_url("http://e.com/A.jpg") != normalise_url("http://e.com/a.jpg")
    assert normalise_url("http://e.com:8080/a.jpg") != normalise_url("http://e.com/a.jpg")


def test_dedup_keeps_the_first_of_each_url():
    frame = _frame(url=["http://E.com/a", "http://e.com/a#x", "http://e.com/b"], caption=["first", "second", "b"])
    kept, num_dupes = dedup_urls(frame)
    assert kept["caption"].tolist() == ["first", "b"] and num_dupes == 1
