"""Test-session setup shared by every test module, and the fixtures several modules take: a tiny random GPT-2 and
a local corpus for harvest tests (module-scoped: built once per module that takes them), and a counter of the
harvest's forward passes."""

import pytest

from sae_ensemble.activations import harvest
from sae_ensemble.activations.tiny_model import SAMPLE_TEXT, build_tiny_gpt2


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return str(build_tiny_gpt2(tmp_path_factory.mktemp("tiny_gpt2")))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    sentences = [s.strip() + "." for s in SAMPLE_TEXT.split(".") if s.strip()]
    path.write_text(
        "\n".join(f"{i} {sentences[i % len(sentences)]} {sentences[(3 * i) % len(sentences)]}" for i in range(400))
    )
    return str(path)


@pytest.fixture(scope="module")
def bridge(model_dir):
    return harvest.boot_model(model_dir)


@pytest.fixture
def forward_passes(monkeypatch) -> list[list[str]]:
    """The hooks captured by each forward pass of the harvest (its probe pass included)."""
    calls: list[list[str]] = []
    run = harvest._run

    def counted(bridge, tokens, capture, stop):
        calls.append(list(capture.hooks))
        return run(bridge, tokens, capture, stop)

    monkeypatch.setattr(harvest, "_run", counted)
    return calls
