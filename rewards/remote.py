"""A reward served over HTTP, for judges that live elsewhere (a bigger RM on another machine, a unit-test
runner, a rules service).

Protocol: ``POST <url>`` with JSON ``{"prompts": [[{role, content}, ...], ...], "responses": ["...", ...]}``,
answered by ``{"rewards": [float, ...]}`` in the same order.

    tristage reward-server --source rule:gold_judge --port 8008          # serve any reward source(s)
    ... reward_model: [http://127.0.0.1:8008/score]                       # use it in a PPO config

The server is the standard library's ThreadingHTTPServer; it binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import json
import time
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable


class RemoteRewardError(RuntimeError):
    pass


class RemoteReward:
    def __init__(self, url: str, timeout: float = 60.0, retries: int = 3, batch_size: int = 64):
        self.url, self.timeout, self.retries, self.batch_size = url, timeout, retries, batch_size

    def _post(self, payload: dict) -> dict:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        last_error = None
        for attempt in range(self.retries):
            request = urllib.request.Request(self.url, data=data, headers={"Content-Type": "application/json"}, method="POST")
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    return json.loads(response.read().decode("utf-8"))
            except (urllib.error.URLError, TimeoutError, ConnectionError, json.JSONDecodeError) as err:
                last_error = err
                time.sleep(min(2.0**attempt * 0.5, 5.0))
        raise RemoteRewardError(f"reward server {self.url} failed after {self.retries} attempts: {last_error}")

    def __call__(self, prompts: list[list[dict]], responses: list[str]) -> list[float]:
        rewards: list[float] = []
        for start in range(0, len(responses), self.batch_size):
            answer = self._post({"prompts": prompts[start : start + self.batch_size],
                                 "responses": responses[start : start + self.batch_size]})
            batch = answer.get("rewards") if isinstance(answer, dict) else None
            if not isinstance(batch, list) or len(batch) != len(responses[start : start + self.batch_size]):
                raise RemoteRewardError(f"reward server {self.url} answered {str(answer)[:200]!r}, expected {{\"rewards\": [...]}} "
                                        "with one number per response")
            rewards += [float(r) for r in batch]
        return rewards


def make_server(score: Callable[[list[list[dict]], list[str]], list[float]], host: str = "127.0.0.1", port: int = 8008) -> ThreadingHTTPServer:
    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's naming)
            try:
                body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                prompts, responses = body["prompts"], body["responses"]
                if not (isinstance(prompts, list) and isinstance(responses, list) and len(prompts) == len(responses)):
                    raise ValueError("prompts and responses must be lists of the same length")
                reply, status = {"rewards": [float(r) for r in score(prompts, responses)]}, 200
            except (KeyError, ValueError, TypeError) as err:
                reply, status = {"error": str(err)}, 400
            data = json.dumps(reply).encode("utf-8")
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):  # quiet: one line per request would drown the training log
            pass

    return ThreadingHTTPServer((host, port), Handler)


def main(argv=None) -> int:
    from rewards.sources import build_reward

    parser = argparse.ArgumentParser(prog="tristage reward-server", description="Serve reward source(s) over HTTP.")
    parser.add_argument("--source", action="append", required=True, help="reward model directory or rule:NAME (repeatable)")
    parser.add_argument("--weight", action="append", type=float, help="one per --source (default 1)")
    parser.add_argument("--normalize", action="store_true", help="normalize reward models with their reward_stats.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    args = parser.parse_args(argv)
    reward = build_reward(args.source, args.weight, normalize=args.normalize)
    server = make_server(lambda prompts, responses: reward(prompts, responses)[1].tolist(), args.host, args.port)
    print(f"[tristage] reward server on http://{args.host}:{server.server_address[1]}/ (POST prompts, responses)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
