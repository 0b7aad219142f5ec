"""The file source and the store: last good version kept on a broken edit, versions, coalescing, watching."""

from __future__ import annotations

import asyncio
from pathlib import Path

from tidegate.resources.model import Key
from tidegate.sources.file import FileSource
from tidegate.store import Store

ROUTE = """apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {{name: {name}, namespace: default}}
spec:
  parentRefs: [{{name: gw}}]
  hostnames: ["{host}"]
"""
KEY = Key("HTTPRoute", "default", "r")


def hostnames(store: Store) -> list[str]:
    res = store.snapshot().get(KEY)
    return res.spec["hostnames"] if res else []


def test_an_invalid_edit_keeps_the_last_good_version_and_says_why(tmp_path: Path):
    file = tmp_path / "route.yaml"
    file.write_text(ROUTE.format(name="r", host="a.example.com"))
    store = Store()
    source = FileSource([tmp_path], store)
    assert source.load() == []
    assert hostnames(store) == ["a.example.com"] and store.version == 1

    file.write_text(ROUTE.format(name="r", host="NOT VALID"))
    problems = source.reload([file])
    assert hostnames(store) == ["a.example.com"] and store.version == 1
    messages = [str(p) for p in problems]
    assert any("spec.hostnames[0]" in m for m in messages)
    assert any("keeping the last good version" in m and "HTTPRoute default/r" in m for m in messages)

    file.write_text(ROUTE.format(name="r", host="b.example.com"))
    assert source.reload([file]) == []
    assert hostnames(store) == ["b.example.com"] and store.version == 2


def test_unparseable_file_keeps_everything_and_deletion_removes(tmp_path: Path):
    file = tmp_path / "route.yaml"
    file.write_text(ROUTE.format(name="r", host="a.example.com"))
    store = Store()
    source = FileSource([tmp_path], store)
    source.load()
    file.write_text("kind: [oops\n")
    source.reload([file])
    assert hostnames(store) == ["a.example.com"]
    file.unlink()
    source.reload([file])
    assert store.snapshot().resources == () and store.version == 2


def test_removing_a_document_from_a_valid_file_removes_the_resource(tmp_path: Path):
    file = tmp_path / "routes.yaml"
    file.write_text(ROUTE.format(name="r", host="a.example.com") + "---\n" + ROUTE.format(name="s", host="s.io"))
    store = Store()
    source = FileSource([file], store)
    source.load()
    assert len(store.snapshot().resources) == 2
    file.write_text(ROUTE.format(name="r", host="a.example.com"))
    source.reload([file])
    assert [r.name for r in store.snapshot().resources] == ["r"]


def test_store_version_grows_only_on_real_change():
    store = Store()
    from tidegate.resources.loader import load_text

    resources = {r.key: r for r in load_text(ROUTE.format(name="r", host="a.io"), "x").resources}
    assert store.replace_source("file", resources)
    assert not store.replace_source("file", dict(resources))
    assert store.version == 1


def test_store_coalesces_a_burst_of_changes_into_one_snapshot():
    from tidegate.resources.loader import load_text

    async def scenario() -> list[int]:
        store = Store()
        seen: list[int] = []

        async def reader() -> None:
            async for snapshot in store.updates(settle=0.05):
                seen.append(snapshot.version)
                if snapshot.version >= 5:
                    return

        task = asyncio.create_task(reader())
        await asyncio.sleep(0.01)
        for i in range(5):
            res = load_text(ROUTE.format(name="r", host=f"h{i}.io"), "x").resources
            store.replace_source("file", {r.key: r for r in res})
            await asyncio.sleep(0.005)
        await asyncio.wait_for(task, 5)
        return seen

    seen = asyncio.run(scenario())
    assert seen[0] == 0 and seen[-1] == 5 and len(seen) == 2


def test_watching_picks_up_an_edit(tmp_path: Path):
    file = tmp_path / "route.yaml"
    file.write_text(ROUTE.format(name="r", host="a.example.com"))

    async def scenario() -> list[str]:
        store = Store()
        source = FileSource([tmp_path], store)
        source.load()
        stop = asyncio.Event()
        watcher = asyncio.create_task(source.watch(stop_event=stop))
        await asyncio.sleep(0.3)
        file.write_text(ROUTE.format(name="r", host="b.example.com"))
        for _ in range(100):  # at most 10 s
            if hostnames(store) == ["b.example.com"]:
                break
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(watcher, 5)
        return hostnames(store)

    assert asyncio.run(scenario()) == ["b.example.com"]


def test_an_edit_bumps_the_generation_and_an_unchanged_reload_does_not(tmp_path: Path):
    file = tmp_path / "route.yaml"
    file.write_text(ROUTE.format(name="r", host="a.example.com"))
    store = Store()
    source = FileSource([tmp_path], store)
    source.load()
    assert store.snapshot().get(KEY).generation == 1
    file.write_text(ROUTE.format(name="r", host="b.example.com"))
    source.reload([file])
    assert store.snapshot().get(KEY).generation == 2
    file.write_text(ROUTE.format(name="r", host="b.example.com") + "\n# a comment changes nothing\n")
    source.reload([file])
    assert store.snapshot().get(KEY).generation == 2 and store.version == 2
