"""``tristage reward-server`` (``launch/run_stage.sh reward-server``): serve reward sources over HTTP with the
protocol of ``rewards/remote.py``, for PPO or eval running elsewhere.

    tristage reward-server --source rule:gold_judge --port 8008
    tristage reward-server --source runs/demo/rm --normalize --host 0.0.0.0 --port 8008

The server is the standard library's ThreadingHTTPServer; it binds to 127.0.0.1 unless --host says otherwise.
"""
from __future__ import annotations

import argparse
import json
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Callable

from stages.common.loading import check_device_and_dtype, inference_device, inference_dtype

from .sources import RewardSourceArguments, build_reward


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
    parser = argparse.ArgumentParser(prog="tristage reward-server", description="Serve reward source(s) over HTTP.")
    parser.add_argument("--source", action="append", required=True, help="reward model directory or rule:NAME (repeatable)")
    parser.add_argument("--weight", action="append", type=float, help="one per --source (default 1)")
    parser.add_argument("--normalize", action="store_true", help="normalize reward models with their reward_stats.json")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8008)
    parser.add_argument("--max-length", type=int, default=None,
                        help="tokens a reward model scores per (prompt, response); default: the max_length it was trained with")
    parser.add_argument("--batch-size", type=int, default=16, help="responses a reward model scores per forward")
    parser.add_argument("--device", default="auto", help="auto (the GPU if there is one), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on a GPU that has it, else float32), float32, bfloat16, float16")
    args = parser.parse_args(argv)
    check_device_and_dtype(args.device, args.dtype, "--device", "--dtype")
    device = inference_device(args.device)
    reward = build_reward(args.source, args.weight, normalize=args.normalize, batch_size=args.batch_size,
                          settings=RewardSourceArguments(reward_max_length=args.max_length), dtype=inference_dtype(args.dtype, device),
                          device=device)
    server = make_server(lambda prompts, responses: reward(prompts, responses)[1].tolist(), args.host, args.port)
    print(f"[tristage] reward server on http://{args.host}:{server.server_address[1]}/ (POST prompts, responses)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0
