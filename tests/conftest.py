"""Test-wide settings: offline, CPU, small thread count, deterministic."""

from __future__ import annotations

import json
import os

# No test may touch the network: the Hub client and transformers stay offline.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


@pytest.fixture(scope="session")
def tiny_model_name(tmp_path_factory) -> str:
    """A registered open_clip config with ViT-B/32's interface (224 px in, 512-d out), tiny:
    the real teacher code runs on it without the 600 MB downloads."""
    import open_clip  # imported here: most tests never need it

    name = "cd2p-test-tiny-vit"
    config = {
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32,
                       "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 1000, "width": 32, "heads": 1,
                     "layers": 1},
    }
    path = tmp_path_factory.mktemp("open_clip_configs") / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name


@pytest.fixture
def one_thread():
    """Run a test on one CPU thread: small ops on a shared 2-core machine are several times
    faster without oversubscription. Use with ``pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_text_model_name(tmp_path_factory) -> str:
    """The tiny config with open_clip's real text vocabulary (49408 BPE tokens, as its bundled
    tokenizer produces) so that the text tower runs on real prompts: zero-shot tests."""
    import open_clip

    name = "cd2p-test-tiny-vit-text"
    config = {
        "embed_dim": 512,
        "quick_gelu": True,
        "vision_cfg": {"image_size": 224, "layers": 1, "width": 64, "head_width": 32,
                       "patch_size": 32},
        "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 1,
                     "layers": 1},
    }
    path = tmp_path_factory.mktemp("open_clip_text_configs") / f"{name}.json"
    path.write_text(json.dumps(config))
    open_clip.add_model_config(path)
    return name
