"""alexnet-bench on the CPU: every feed of the training step, the pipeline stages, the figures they report."""

import pytest

from alexnet_pipeline import bench, pipeline
from alexnet_pipeline.config import OptionError


def test_train_bench_times_every_feed_and_reports_ratios_and_tflops(prepped):
    result = bench.train_rates(bench.TrainBench(shards=prepped, batch_size=4, steps=1, repeats=1, device="cpu",
                                                num_threads=1, baseline_workers=1, width=0.0625,
                                                feeds="synthetic,dali,dali-cpu,dataloader"))
    rates = result["images_per_s"]
    assert list(rates) == ["synthetic", "dali", "dali-cpu", "dataloader"] and all(r > 0 for r in rates.values())
    assert result["over_synthetic"]["synthetic"] == 1.0
    assert result["dali_over_dataloader"] == pytest.approx(rates["dali"] / rates["dataloader"])
    assert result["tflops"]["dali"] == pytest.approx(rates["dali"] * result["train_flops_per_image"] / 1e12)
    assert result["matmul_bf16_tflops"] is None  # measured on GPUs only


@pytest.mark.parametrize("feed,options", [("dali", {}), ("dali-cpu", {"decoder": "cpu"}),
                                          ("dali-hw0.5", {"decoder": "mixed", "hw_decoder_load": 0.5})])
def test_feed_names_map_to_loader_options(feed, options):
    assert bench._dali_overrides(feed) == options


@pytest.mark.parametrize("feeds,message", [("dali", "synthetic is the reference"), ("synthetic,dali-xx", "dali-xx")])
def test_bad_feeds_are_refused(prepped, feeds, message):
    with pytest.raises(OptionError, match=message):
        bench.TrainBench(shards=prepped, feeds=feeds)


def test_pipeline_bench_has_the_same_order_variant_and_the_decode_ceiling(prepped):
    result = bench.pipeline_rates(bench.PipelineBench(shards=prepped, batch_size=4, num_threads=1, repeats=1,
                                                      steps=3, baseline=False))
    train, tencrop = result["train"]["images_per_s"], result["tencrop_eval"]["images_per_s"]
    assert {"dali", "dali_same_order", "decode_only"} <= set(train) and "dali_same_order" not in tencrop
    assert result["train"]["dali_over_decode_only"] == pytest.approx(train["dali"] / train["decode_only"])


def test_each_feed_builds_one_pipeline_over_several_epochs(prepped, monkeypatch):
    """The step is fed as alexnet-train feeds it: one loader per feed, kept across epochs."""
    from alexnet_pipeline import pipeline, shards

    builds, real = [], pipeline.build_pipeline
    monkeypatch.setattr(pipeline, "build_pipeline", lambda *a, **k: builds.append(1) or real(*a, **k))
    n = shards.load_manifest(prepped).splits["train"].samples
    steps, repeats, batch = 6, 2, 4
    assert (repeats + 1) * steps * batch > 2 * n  # warm-up and repeats span more than two epochs
    feeds = "synthetic,dali,dali-run2,dali-cpu"
    result = bench.train_rates(bench.TrainBench(shards=prepped, batch_size=batch, steps=steps, repeats=repeats,
                                                device="cpu", num_threads=1, width=0.0625, feeds=feeds))
    assert len(builds) == len(feeds.split(",")) and set(result["images_per_s"]) == set(feeds.split(","))


def test_loader_bench_varies_one_axis_at_a_time_and_times_every_row(prepped):
    cfg = bench.LoaderBench(shards=prepped, batch_size=4, steps=4, repeats=1, device="cpu", num_threads=1,
                            axes=("batches_per_run", "prefetch", "hw_decoder_load"))
    rows = bench.loader_rows(cfg)
    changes = [{k: v for k, v in r.items() if k != "what"} for r in rows if r["what"] == "train"]
    assert changes == [{}, *({"batches_per_run": k} for k in (1, 2, 4, 8)),
                       {"prefetch": 4}, {"prefetch": 6}]  # the hardware decoder's axis needs a GPU
    assert [r for r in rows if r["what"] == "read"] == [{"what": "read", "draws": "host"},
                                                         {"what": "read", "draws": "dali"}]
    result = bench.loader_rates(cfg)
    assert len(result["rows"]) == len(rows) and all(r["images_per_s"] > 0 for r in result["rows"])
    auto = 4 * min(64, len(pipeline.train_loader(prepped, batch_size=4, num_threads=1)))  # runs of >= 256 images
    assert [r["dali_batch"] for r in result["rows"] if r["what"] == "decode"][:5] == [auto, 4, 8, 16, 32]


def test_prep_bench_times_prep_and_verify_with_one_and_all_workers(sample):
    result = bench.prep_rates(bench.PrepBench(imagenet_root=sample[0] / "extracted", workers=2, repeats=1))
    assert set(result["images_per_s"]) == {"naive", "prep_1_worker", "prep_2_workers"}
    assert set(result["verify_images_per_s"]) == {"verify_1_worker", "verify_2_workers"}
    assert result["verify_all_to_1_worker"] == pytest.approx(result["verify_images_per_s"]["verify_2_workers"] /
                                                             result["verify_images_per_s"]["verify_1_worker"])


def test_storage_bench_times_each_row_against_the_local_loader_with_its_own_s3_server(prepped, tmp_path,
                                                                                      monkeypatch):
    import os

    from conftest import numbered

    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    before = dict(os.environ)
    data = numbered(prepped, tmp_path / "data", [3] * 40)  # room for the quarter cache's row
    result = bench.storage_rates(bench.StorageBench(shards=data, batch_size=2, num_threads=1, repeats=1, streams=1,
                                                    shuffle_window=1, read_ahead=1, latency_ms=0, dali_s3=False,
                                                    batches_per_run=1))  # runs of the default would span the split
    rows = ["local", "local_first_epoch", "dali_reader", "store_first_epoch", "store_cached", "store_quarter_cache",
            "reader_alone", "dali_reader_alone"]
    assert list(result["images_per_s"]) == rows and len(result["rounds"]) == 1
    assert all(r > 0 for r in result["images_per_s"].values())
    assert result["over_local"]["local"] == 1.0
    rates = result["images_per_s"]
    assert result["over_local"]["store_cached"] == pytest.approx(rates["store_cached"] / rates["local"])
    assert result["over_local"]["store_first_epoch"] == pytest.approx(rates["store_first_epoch"] /
                                                                      rates["local_first_epoch"])
    assert set(result["server_cpu_share"]) == {r for r in rows if r.startswith("store")}
    assert all(0 <= v <= 1 for v in result["server_cpu_share"].values())
    assert set(result["cores_busy"]) == set(rows) and all(v > 0 for v in result["cores_busy"].values())
    assert dict(os.environ) == before  # its server's endpoint and test credentials went with it
