"""Alerts: `--alert-cmd` gets the JSON on stdin, `--alert-webhook` gets it by POST, and a failing alert
is one warning line, never an exception."""

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
import torch
from conftest import final_ckpt

from yolo_resume.alerts import Alerter, build_payload, last_metrics, newest_checkpoint, redact_url


class Receiver:
    """A real HTTP server on 127.0.0.1: POST /ok answers 200, /status/N answers N; records every request."""

    def __init__(self):
        self.requests: list[dict] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.requests.append(
                    {"path": self.path, "content_type": self.headers.get("Content-Type"), "body": body}
                )
                status = int(self.path.rsplit("/", 1)[-1]) if self.path.startswith("/status/") else 200
                self.send_response(status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def payloads(self, path: str = "/ok") -> list[dict]:
        return [json.loads(r["body"]) for r in self.requests if r["path"] == path]

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def closed_port_url() -> str:
    """A URL on 127.0.0.1 where nothing listens (connection refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/hook"


def fake_checkpoint(run, step: int, epoch: int = 0):
    """A small checkpoint that verifies (the supervisor and the alerts only read its metadata)."""
    from yolo_resume.checkpoint.format import write_checkpoint

    (run / "checkpoints").mkdir(parents=True, exist_ok=True)
    meta = {"global_step": step, "epoch": epoch, "step_in_epoch": 1}
    return write_checkpoint(run / "checkpoints", final_ckpt(run, step).name, {"w": torch.zeros(2)}, meta)


def fields(**extra):
    return {"returncode": -9, "attempt": 2, "restarts_left": 1, "message": "attempt 2 was killed by SIGKILL"} | extra


def test_webhook_and_command_receive_the_same_payload(receiver, workdir):
    warnings = []
    alerter = Alerter("cat > alert-$YOLO_RESUME_EVENT.json", receiver.url + "/ok", warnings.append)
    sent = alerter.fire("failure", workdir / "run", **fields())
    alerter.close()
    assert warnings == []
    [posted] = receiver.payloads()
    assert receiver.requests[0]["content_type"] == "application/json"
    from_cmd = json.loads((workdir / "alert-failure.json").read_text())
    assert posted == from_cmd == sent
    assert posted["event"] == "failure" and posted["signal"] == "SIGKILL" and posted["exit_code"] is None
    assert posted["attempt"] == 2 and posted["restarts_left"] == 1
    assert posted["run_dir"] == str((workdir / "run").resolve())
    assert posted["newest_checkpoint"] is None and posted["last_metrics"] is None  # nothing saved yet
    assert (
        posted["message"] == "attempt 2 was killed by SIGKILL" and posted["host"] and posted["time"].endswith("+00:00")
    )


def test_alerts_arrive_in_order(receiver, workdir):
    alerter = Alerter(None, receiver.url + "/ok", lambda m: None)
    for event in ("failure", "restart", "completed"):
        alerter.fire(event, workdir, **fields(returncode=0))
    alerter.close()
    assert [p["event"] for p in receiver.payloads()] == ["failure", "restart", "completed"]


def test_failing_alerts_warn_and_never_raise(receiver, workdir):
    warnings = []
    quick = {"retry_delays_s": (0.01, 0.01), "webhook_timeout_s": 2}
    # A command that fails, a 500 (retried: three tries), a 404 (not retried), nothing listening.
    Alerter("echo 'no route to pager' >&2; exit 1", None, warnings.append).deliver("failure", b"{}")
    assert not Alerter(None, receiver.url + "/status/500", warnings.append, **quick).post_webhook("failure", b"{}")
    assert not Alerter(None, receiver.url + "/status/404", warnings.append, **quick).post_webhook("failure", b"{}")
    assert not Alerter(None, closed_port_url(), warnings.append, **quick).post_webhook("failure", b"{}")
    assert [r["path"] for r in receiver.requests] == ["/status/500"] * 3 + ["/status/404"]
    assert warnings[0] == "failure alert command exited 1: no route to pager"
    assert "HTTP 500" in warnings[1] and "after 3 tries" in warnings[1]
    assert "HTTP 404" in warnings[2] and "after 1 tries" in warnings[2]
    assert "refused" in warnings[3].lower() and "after 3 tries" in warnings[3]
    assert len(warnings) == 4


def test_alert_command_timeout_kills_it(workdir):
    warnings = []
    start = time.monotonic()
    ok = Alerter("sleep 30; touch late", None, warnings.append, cmd_timeout_s=0.5).run_cmd("restart", b"{}")
    assert not ok and time.monotonic() - start < 10
    assert warnings == ["restart alert command timed out after 0.5 s and was killed"]
    time.sleep(0.2)
    assert not (workdir / "late").exists()  # the whole process group was killed, not only the shell


def test_webhook_secrets_stay_out_of_warnings_and_payloads(workdir, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "hunter2-secret")
    url = closed_port_url().replace("/hook", "/services/T000/B000/XXXXTOKEN?key=abc")
    warnings = []
    alerter = Alerter(None, url, warnings.append, retry_delays_s=(), webhook_timeout_s=2)
    payload = alerter.fire("failure", workdir, **fields())
    alerter.close()
    assert "hunter2" not in json.dumps(payload) and "AWS_SECRET" not in json.dumps(payload)
    assert len(warnings) == 1 and "XXXXTOKEN" not in warnings[0] and "key=abc" not in warnings[0]
    assert redact_url("https://user:pw@hooks.example.com:8443/a/b?t=1") == "https://hooks.example.com:8443/..."
    assert redact_url("http://127.0.0.1:9/") == "http://127.0.0.1:9"
    not_http = []
    assert not Alerter(None, "file:///etc/passwd", not_http.append).enabled
    assert "not an http(s) URL" in not_http[0]


def test_payload_names_newest_valid_checkpoint_and_last_metrics(tmp_path):
    run = tmp_path / "run"
    fake_checkpoint(run, 3)
    fake_checkpoint(run, 4, epoch=1)
    final_ckpt(run, 5).mkdir()  # newer, but not a checkpoint that verifies (no manifest)
    (run / "results.csv").write_text("epoch,segment,box_loss,lr,map50,note\n1,0,3.5,0.01,0.0,\n2,1,3.25,0.005,0.125,\n")
    newest = newest_checkpoint(run)
    assert newest == {"name": "ckpt-000000004", "path": str(final_ckpt(run, 4).resolve()), "epoch": 1, "global_step": 4}
    assert last_metrics(run) == {"epoch": 2, "segment": 1, "box_loss": 3.25, "lr": 0.005, "map50": 0.125}
    payload = build_payload("completed", run, returncode=0, attempt=1, restarts_left=2, message="done")
    assert payload["exit_code"] == 0 and payload["signal"] is None
    assert payload["newest_checkpoint"] == newest and payload["last_metrics"]["map50"] == 0.125
    json.dumps(payload, allow_nan=False)  # strict JSON
    (run / "results.csv").write_text("epoch,box_loss\n")  # header only: no epoch finished
    assert last_metrics(run) is None
