"""On a CUDA machine: two half-GPU replicas of the real CUDA vLLM engine share one GPU."""

from __future__ import annotations

import openai
import pytest

from tests.helpers import ServeCluster

pytestmark = [pytest.mark.gpu, pytest.mark.integration]


def test_two_half_gpu_vllm_replicas_share_one_gpu(tiny_model_path):
    import torch

    c = ServeCluster(num_cpus=8, num_gpus=1)
    try:
        c.deploy({"models": [{"name": "tiny", "source": tiny_model_path, "gpus": 0.5, "replicas": 2,
                              "max_model_len": 512, "dtype": "float16"}]})
        client = openai.OpenAI(base_url=c.base_url + "/v1", api_key="none", max_retries=0)
        texts = {client.completions.create(model="tiny", prompt="x", max_tokens=8, seed=i).choices[0].text for i in range(8)}
        assert texts
        st = client.get("/status", cast_to=object)
        dep = st["deployments"]["model-tiny"]
        assert dep["running"] == 2 and dep["pending"] == 0
        free, total = torch.cuda.mem_get_info()
        # Each engine took at most 0.45 of the GPU: at least ~10% stays free.
        assert free / total > 0.05
    finally:
        c.close()
