"""The web dashboard in a real browser: headless Chromium (Debian's chromium and chromium-driver, driven by
selenium) loads it from the admin listener while traffic flows. The numbers must move, an endpoint failing
its health checks must show as unhealthy, and a screenshot is kept in test-artifacts/."""

from __future__ import annotations

import http.client
import shutil
import threading
import time
from pathlib import Path

import pytest

from tests.harness import free_port, request, tidegate_run, wait_until
from tests.manifests import actively_checked_app
from tests.scripted import scripted_backends

GW = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent
ARTIFACTS = ROOT / "test-artifacts"
CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
pytestmark = pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                                reason="Debian's chromium and chromium-driver are not installed (scripts/test does)")


def _browser(profile: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-default-apps", "--window-size=1280,1600", f"--user-data-dir={profile}"):
        options.add_argument(flag)
    return webdriver.Chrome(service=Service(executable_path=CHROMEDRIVER), options=options)


def _text(driver, element_id: str) -> str:
    return driver.find_element("id", element_id).text


def test_the_dashboard_shows_live_numbers_and_an_unhealthy_endpoint(tmp_path):
    port, pod_port = free_port(GW), free_port("127.0.10.1")
    pods = [("127.0.10.1", pod_port, "pod-a"), ("127.0.10.2", pod_port, "pod-b")]
    config = tmp_path / "config"
    config.mkdir()
    lb_port = free_port("127.0.10.200")
    https_port = free_port(GW)
    (config / "all.yaml").write_text(actively_checked_app(GW, port, pods) + f"""
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {{name: certs, namespace: default}}
spec:
  gatewayClassName: tidegate
  addresses: [{{value: {GW}}}]
  listeners:
    - {{name: https, port: {https_port}, protocol: HTTPS, hostname: shop.test,
       tls: {{mode: Terminate, options: {{tidegate.io/acme-issuer: nowhere}}}}}}
---
apiVersion: tidegate.io/v1alpha1
kind: AcmeIssuer
metadata: {{name: nowhere, namespace: default}}
spec: {{server: "https://127.0.0.1:1/directory"}}""" + f"""
---
apiVersion: metallb.io/v1beta1
kind: IPAddressPool
metadata: {{name: lab, namespace: metallb-system}}
spec: {{addresses: [127.0.10.200/32]}}
---
apiVersion: v1
kind: Service
metadata: {{name: shop, namespace: default}}
spec:
  type: LoadBalancer
  loadBalancerClass: tidegate.io/lb
  ports: [{{port: {lb_port}, targetPort: {pod_port}}}]
---
apiVersion: v1
kind: Service
metadata: {{name: too-many, namespace: default}}
spec: {{type: LoadBalancer, loadBalancerClass: tidegate.io/lb, ports: [{{port: {lb_port}}}]}}
---
apiVersion: tidegate.io/v1alpha1
kind: TrafficPolicy
metadata: {{name: keep-out, namespace: default}}
spec:
  targetRefs: [{{group: gateway.networking.k8s.io, kind: HTTPRoute, name: app}}]
  ipAccess: {{deny: [127.0.0.77]}}
""")
    stop = threading.Event()
    sent = [0]

    def traffic() -> None:  # bounded: at most 3,000 requests or 60 s
        deadline = time.monotonic() + 60
        while not stop.is_set() and sent[0] < 3000 and time.monotonic() < deadline:
            request(GW, port, "/", headers={"Host": "app.test"}, timeout=5)
            sent[0] += 1
            time.sleep(0.01)

    with scripted_backends(*pods) as (_, b), \
            tidegate_run(config, (GW, port), tmp_path / "tidegate.log", "--acme-dir", str(tmp_path / "acme")) as proxy:
        b.healthy = False
        driver = _browser(tmp_path / "chromium-profile")
        loader = threading.Thread(target=traffic)
        try:
            driver.get(f"http://127.0.0.1:{proxy.admin_port}/")  # redirects to /dashboard/
            wait_until(lambda: _text(driver, "version") == "config version 1", timeout=15, what="the config version")
            wait_until(lambda: _text(driver, "ready") == "ready", timeout=15, what="readiness")
            loader.start()
            first = wait_until(lambda: _rate(driver), timeout=15, what="a request rate above zero")
            total_first = int(_text(driver, "total"))
            wait_until(lambda: int(_text(driver, "total")) > total_first + 20,
                       timeout=15, what="the request count to grow")
            readings = {first}
            wait_until(lambda: readings.add(_rate(driver)) or len(readings) > 1, timeout=15, what="the rate to change")
            assert _text(driver, "p99").startswith(("≤", ">"))
            rows = {r.get_attribute("data-endpoint"): r for r in driver.find_elements("css selector", "tr[data-endpoint]")}
            wait_until(lambda: _state(driver, f"127.0.10.2:{pod_port}") == "unhealthy",
                       timeout=15, what="pod-b shown unhealthy")
            assert _state(driver, f"127.0.10.1:{pod_port}") == "healthy"
            assert "unhealthy" in driver.find_element("css selector", f'tr[data-endpoint="127.0.10.2:{pod_port}"]').text
            assert rows
            route_rows = driver.find_elements("css selector", "#routes tbody tr")
            assert any("Accepted=True" in r.text for r in route_rows)
            wait_until(lambda: any(_cell_rate(r) > 0 for r in driver.find_elements("css selector", "#routes tbody tr")),
                  what="the route's own request rate")
            lb = wait_until(lambda: driver.find_elements("css selector", 'tr[data-address="127.0.10.200"]'),
                            what="the LoadBalancer Service's row")[0].text
            assert "default/shop" in lb and "lab" in lb and f"{lb_port}/TCP" in lb and "Cluster" in lb
            refused = driver.find_element("id", "lb-refused").text
            assert "default/too-many" in refused and "PoolExhausted" in refused
            # TrafficPolicy refusals per route: a client the policy denies.
            for _ in range(5):
                conn = http.client.HTTPConnection(GW, port, timeout=5, source_address=("127.0.0.77", 0))
                conn.request("GET", "/", headers={"Host": "app.test"})
                assert conn.getresponse().status == 403
                conn.close()
            edge = wait_until(lambda: driver.execute_script(
                "const r = document.querySelector('#edge tr[data-route]'); return r && r.innerText"),
                timeout=15, what="the route's refusals on the dashboard")
            cells = edge.split("\t")
            assert cells[0] == "httproute/default/app/rule/0" and cells[-1] == "5", cells
            # An ACME certificate whose CA cannot be reached: failed, with the reason.
            certificate = wait_until(lambda: driver.execute_script(
                "const r = document.querySelector('#certificates tr[data-secret=\"default/acme-certs-https\"]');"
                " return r && r.innerText.includes('failed') && r.innerText"), timeout=15,
                what="the certificate's row, failed")
            assert "shop.test" in certificate and "AcmeIssuer default/nowhere" in certificate, certificate
            ARTIFACTS.mkdir(exist_ok=True)
            driver.save_screenshot(str(ARTIFACTS / "dashboard.png"))
        finally:
            stop.set()
            if loader.is_alive():
                loader.join(10)
            driver.quit()
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10_000


def _cell_rate(row) -> float:
    cells = row.find_elements("css selector", "td")
    try:
        return float(cells[3].text)
    except (IndexError, ValueError):
        return 0.0


def _rate(driver) -> float:
    text = _text(driver, "rps")
    try:
        return float(text)
    except ValueError:
        return 0.0


def _state(driver, endpoint: str) -> str:
    rows = driver.find_elements("css selector", f'tr[data-endpoint="{endpoint}"]')
    return rows[0].get_attribute("data-state") if rows else ""
