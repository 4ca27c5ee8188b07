"""Ingest end to end on loopback against calling img2dataset directly on the same input.

Both download the same demo images from a server on 127.0.0.1, resize to the same size and
write WebDataset shards; ours adds Ray, the metadata filters, URL and content deduplication
and the atomic final shards. Prints one JSON line: images/s of both and the ratio ours / peer
(the target is an overhead of at most 10%, ratio >= 0.91).

    python bench/ingest.py [--num-images 2000] [--part-size 500]
"""
import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from jobs.demo.http_server import LoopbackServer
from jobs.demo.scenes import with_base_url, write_demo_dataset
from pipeline.ingest.stage import IngestConfig, ingest
from pipeline.ray_cluster import RayConfig, init_ray


def run_peer(urls: Path, out: Path, args) -> float:
    from img2dataset import download

    start = time.perf_counter()
    download(url_list=str(urls), input_format="parquet", url_col="url", caption_col="caption",
             output_folder=str(out), output_format="webdataset", number_sample_per_shard=args.part_size,
             image_size=args.image_size, resize_mode="center_crop", thread_count=args.threads,
             processes_count=os.cpu_count(), distributor="multiprocessing", compute_hash="sha256",
             timeout=10, enable_wandb=False)
    return time.perf_counter() - start


def run_ours(urls: Path, out: Path, args) -> float:
    cfg = IngestConfig(inputs=[str(urls)], output_dir=str(out), image_size=args.image_size,
                       part_size=args.part_size, thread_count=args.threads, ray=RayConfig(object_store_mb=256))
    start = time.perf_counter()
    summary = ingest(cfg)
    assert summary["downloaded"] == args.num_images, summary
    return time.perf_counter() - start


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--num-images", type=int, default=2000)
    ap.add_argument("--part-size", type=int, default=500)
    ap.add_argument("--image-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=16)
    args = ap.parse_args()
    init_ray(RayConfig(object_store_mb=256))  # cluster start-up is not part of either measurement
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_demo_dataset(tmp / "www", args.num_images, seed=0, image_size=128)
        with LoopbackServer(tmp / "www") as server:
            urls = with_base_url(tmp / "www" / "urls.parquet", server.base_url, tmp / "urls.parquet")
            peer_s = run_peer(urls, tmp / "peer", args)
            ours_s = run_ours(urls, tmp / "ours", args)
    ours, peer = args.num_images / ours_s, args.num_images / peer_s
    print(json.dumps({"bench": "ingest", "device": "cpu", "cores": os.cpu_count(), "num_images": args.num_images,
                      "ours_img_s": round(ours, 1), "peer_img_s": round(peer, 1), "ratio": round(ours / peer, 3),
                      "overhead": round(peer / ours - 1, 3)}))


if __name__ == "__main__":
    main()
