"""alexnet-bench on the CPU: every feed of the training step, the pipeline stages, the figures they report."""

import pytest

from alexnet_pipeline import bench
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
