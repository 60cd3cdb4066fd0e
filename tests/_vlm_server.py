"""A real OpenAI-compatible chat-completions server running a tiny random-weight LLaVA (test helper).

    python tests/_vlm_server.py --model DIR --port P

POST /v1/chat/completions decodes the data-URL images, applies the processor's chat template
and generates greedily with the model. Random weights produce random text, so `POST /control`
sets how the answer is finished, for parsing and failure tests:
    wrap       generated text + "Final Score: n" (n from the generated ids) or "Image k is better" (2 images)
    oracle     generated text + a verdict from mean brightness (score 1 + 4·brightness, brighter image wins)
    raw        the generated text only (unparsable)
    sleep      wait `sleep_s` before answering (client timeouts)
    fail       answer 500 to the next `fail_count` requests, then behave as `then`
GET /stats: requests seen, most in flight at once. GET /health: up.
"""

from __future__ import annotations

import argparse
import base64
import io
import threading
import time

import numpy as np
import torch
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from PIL import Image


def make_app(model_dir: str, max_new_tokens: int) -> FastAPI:
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    torch.set_num_threads(1)
    proc = AutoProcessor.from_pretrained(model_dir)
    model = LlavaForConditionalGeneration.from_pretrained(model_dir).eval()
    app = FastAPI()
    state = {"mode": "wrap", "then": "wrap", "fail_count": 0, "sleep_s": 0.0, "requests": 0, "inflight": 0,
             "max_inflight": 0}
    lock, gen_lock = threading.Lock(), threading.Lock()

    @app.get("/health")
    def health():
        return {"status": "ok"}

    @app.get("/stats")
    def stats():
        return {k: state[k] for k in ("requests", "max_inflight", "mode")}

    @app.post("/control")
    async def control(request: Request):
        body = await request.json()
        with lock:
            state.update(body)
            state["max_inflight"] = 0
            state["requests"] = 0
        return {k: state[k] for k in ("mode", "then", "fail_count", "sleep_s")}

    @app.post("/v1/chat/completions")
    def chat(body: dict):
        with lock:
            state["requests"] += 1
            state["inflight"] += 1
            state["max_inflight"] = max(state["max_inflight"], state["inflight"])
            mode = state["mode"]
            if mode == "fail":
                state["fail_count"] -= 1
                if state["fail_count"] <= 0:
                    state["mode"] = state["then"]
        try:
            if mode == "fail":
                return JSONResponse({"error": {"message": "transient failure (test)"}}, status_code=500)
            if mode == "sleep":
                time.sleep(float(state["sleep_s"]))
            images, messages = [], []
            for m in body["messages"]:
                parts = m["content"] if isinstance(m["content"], list) else [{"type": "text", "text": m["content"]}]
                for p in parts:
                    if p["type"] == "image_url":
                        raw = base64.b64decode(p["image_url"]["url"].split(",", 1)[1])
                        images.append(Image.open(io.BytesIO(raw)).convert("RGB"))
                messages.append({"role": m["role"], "content": parts})
            text = proc.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            inputs = proc(text=[text], images=images or None, return_tensors="pt")
            n = min(int(body.get("max_tokens") or max_new_tokens), max_new_tokens)
            with gen_lock, torch.no_grad():
                out = model.generate(**inputs, max_new_tokens=n, do_sample=False)
            ids = out[0, inputs["input_ids"].shape[1]:]
            answer = proc.tokenizer.decode(ids, skip_special_tokens=True)
            if mode in ("wrap", "sleep"):
                k = int(ids.sum())
                answer += f"\nImage {1 + k % 2} is better" if len(images) == 2 else f"\nFinal Score: {1 + k % 5}"
            elif mode == "oracle":
                bright = [float(np.asarray(im).mean()) / 255 for im in images]
                answer += (f"\nImage {1 if bright[0] >= bright[1] else 2} is better" if len(images) == 2
                           else f"\nFinal Score: {1 + 4 * bright[0]:.3f}")
            return {"id": f"chatcmpl-{state['requests']}", "object": "chat.completion", "created": int(time.time()),
                    "model": body.get("model", "tiny"),
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": answer},
                                 "finish_reason": "stop"}],
                    "usage": {"prompt_tokens": int(inputs["input_ids"].shape[1]), "completion_tokens": int(len(ids)),
                              "total_tokens": int(out.shape[1])}}
        finally:
            with lock:
                state["inflight"] -= 1

    return app


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--max-new-tokens", type=int, default=6)
    a = ap.parse_args()
    uvicorn.run(make_app(a.model, a.max_new_tokens), host="127.0.0.1", port=a.port, log_level="warning")
