"""The client of a reward served over HTTP, for judges that live elsewhere (a bigger RM on another machine, a
unit-test runner, a rules service); ``rewards/server.py`` is the server.

Protocol: ``POST <url>`` with JSON ``{"prompts": [[{role, content}, ...], ...], "responses": ["...", ...]}``,
answered by ``{"rewards": [float, ...]}`` in the same order.

    tristage reward-server --source rule:gold_judge --port 8008          # serve any reward source(s)
    ... reward_model: [http://127.0.0.1:8008/score]                       # use it in a PPO config
"""
from __future__ import annotations

import json
import time
import urllib.error
import urllib.request


class RemoteRewardError(RuntimeError):
    pass


class RemoteReward:
    """``timeout`` seconds per request, ``retries`` attempts (backing off 0.5, 1, 2, ... up to 5 s between them), and
    ``batch_size`` responses per request: PPO's and eval's ``remote_timeout``, ``remote_retries``, ``remote_batch_size``."""

    def __init__(self, url: str, timeout: float, retries: int, batch_size: int):
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
