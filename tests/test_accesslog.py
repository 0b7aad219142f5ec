"""Access logs: JSON lines and Common/Combined Log Format, request ids, filters, nothing lost on stop."""

from __future__ import annotations

import calendar
import json
import re
import signal
import time

from tests.harness import echo_servers, free_port, request, tidegate_run
from tests.manifests import http_gateway, route, service
from tidegate.observe.accesslog import AccessLog, Entry, parse_status_filter

GW, POD = "127.0.0.1", "127.0.0.6"


def run_and_log(tmp_path, *flags: str, requests: list[tuple[str, dict]]) -> str:
    echo_port, port = free_port(POD), free_port(GW)
    config = tmp_path / "config"
    config.mkdir()
    (config / "c.yaml").write_text(http_gateway(GW, port) + service("a", [(POD, echo_port, "pod-a")])
                                   + route("r", "log.test", "- backendRefs: [{name: a, port: 80}]"))
    log_file = tmp_path / "access.log"
    with echo_servers({(POD, echo_port): "default/pod-a"}, tmp_path / "echo.log"):
        with tidegate_run(config, (GW, port), tmp_path / "tidegate.log", "--access-log-file", str(log_file),
                          *flags) as proxy:
            for path, headers in requests:
                request(GW, port, path, headers={"Host": "log.test", "User-Agent": "probe/1", **headers})
            proxy.send_signal(signal.SIGTERM)  # the last batch must still be written
            assert proxy.wait(10) == 0
    return log_file.read_text()


def test_json_lines_carry_the_request_and_where_it_went(tmp_path):
    before = time.time()
    text = run_and_log(tmp_path, "--access-log", "json",
                       requests=[("/a?x=1", {"X-Request-Id": "abc123"}), ("/b", {}), ("/c", {"Host": "nope.test"})])
    after = time.time()
    lines = [json.loads(line) for line in text.splitlines()]
    for entry in lines:  # wall-clock time, in UTC, to the millisecond
        stamp, millis = re.fullmatch(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z", entry["time"]).groups()
        logged = calendar.timegm(time.strptime(stamp, "%Y-%m-%dT%H:%M:%S")) + int(millis) / 1000
        assert before - 0.01 <= logged <= after, (before, entry["time"], after)
    assert [entry["path"] for entry in lines] == ["/a?x=1", "/b", "/c"]
    first = lines[0]
    assert first["status"] == 200 and first["method"] == "GET" and first["host"] == "log.test"
    assert first["route"] == "httproute/default/r/rule/0" and first["endpoint"].startswith(POD + ":")
    assert first["request_id"] == "abc123" and first["bytes"] > 0 and first["duration_ms"] > 0
    assert first["client"] == "127.0.0.1" and first["protocol"] == "HTTP/1.1"
    assert re.fullmatch(r"[0-9a-f]{32}", lines[1]["request_id"])  # generated when the client sent none
    assert lines[2]["status"] == 404 and lines[2]["route"] == ""


def test_combined_log_format_and_a_status_filter(tmp_path):
    text = run_and_log(tmp_path, "--access-log", "combined", "--access-log-status", "400-599",
                       requests=[("/ok", {}), ("/missing", {"Host": "nope.test", "Referer": "http://r.example/"})])
    (line,) = text.splitlines()  # the 200 is filtered out
    assert re.fullmatch(r'127\.0\.0\.1 - - \[\d\d/\w{3}/\d{4}:\d\d:\d\d:\d\d \+0000\] "GET /missing HTTP/1\.1" 404 \d+ '
                        r'"http://r\.example/" "probe/1"', line), line


def test_formatting_and_filters_without_processes():
    entry = Entry(0.0, "10.0.0.1", "POST", "h", "/p", "HTTP/1.1", 502, 0, 0.1, 0.05, "r", "l", "e:1", 2, "",
                  "id", "", "")
    clf = AccessLog("clf", "/dev/null")
    assert clf.format_entry(entry) == '10.0.0.1 - - [01/Jan/1970:00:00:00 +0000] "POST /p HTTP/1.1" 502 -\n'
    assert json.loads(AccessLog("json", "/dev/null").format_entry(entry))["retries"] == 2
    assert parse_status_filter("500") == (500, 500) and parse_status_filter("") is None
    assert not AccessLog("json", "/dev/null", statuses="500-599").wants(200)


def test_a_gateway_chooses_its_own_access_log(tmp_path):
    """Global --access-log off; Gateway "loud" says json through tidegate.io/access-log, Gateway "quiet" says
    nothing: only loud's requests are logged. Then the other way round: global json, loud says off."""
    echo_port, loud_port, quiet_port = free_port(POD), free_port(GW), free_port("127.0.0.7")
    config = tmp_path / "config"
    config.mkdir()
    loud = http_gateway(GW, loud_port).replace("name: gw, namespace: default}",
                                               "name: gw, namespace: default, annotations: {tidegate.io/access-log: json}}")
    quiet = http_gateway("127.0.0.7", quiet_port).replace("kind: GatewayClass", "kind: GatewayClass").replace(
        "name: gw, namespace: default}", "name: quiet, namespace: default}")
    quiet = quiet.split("---", 1)[1]  # the GatewayClass is in `loud` already
    routes = route("r", "log.test", "- backendRefs: [{name: a, port: 80}]") + route(
        "q", "log.test", "- backendRefs: [{name: a, port: 80}]").replace("parentRefs: [{name: gw}]",
                                                                          "parentRefs: [{name: quiet}]")
    (config / "c.yaml").write_text(loud + "---" + quiet + service("a", [(POD, echo_port, "pod-a")]) + routes)
    log_file = tmp_path / "access.log"
    with echo_servers({(POD, echo_port): "default/pod-a"}, tmp_path / "echo.log"):
        with tidegate_run(config, (GW, loud_port), tmp_path / "tidegate.log", "--access-log-file", str(log_file),
                          "--access-log", "off") as proxy:
            assert request(GW, loud_port, "/loud", headers={"Host": "log.test"})[0] == 200
            assert request("127.0.0.7", quiet_port, "/quiet", headers={"Host": "log.test"})[0] == 200
            proxy.send_signal(signal.SIGTERM)
            assert proxy.wait(10) == 0
    lines = [json.loads(line) for line in log_file.read_text().splitlines()]
    assert [entry["path"] for entry in lines] == ["/loud"]
    assert lines[0]["listener"] == "default/gw/http"


def test_a_bad_access_log_annotation_is_reported_and_the_global_setting_applies():
    from tidegate.resources.loader import load_text
    from tidegate.translate import translate

    text = http_gateway(GW, 8080).replace("name: gw, namespace: default}",
                                          "name: gw, namespace: default, annotations: {tidegate.io/access-log: loud}}")
    result = translate(load_text(text, "t").resources)
    assert [listener.access_log for listener in result.ir.listeners] == [""]
    assert any("tidegate.io/access-log" in n.message and "'loud'" in n.message for n in result.notes)
