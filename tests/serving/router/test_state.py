"""Loading and reloading without a network: what a reload keeps, what a bad reload leaves alone."""

import asyncio
import hashlib

import pytest
import yaml
from kvpilot.serving.router.config import ConfigError
from kvpilot.serving.router.proxy import _upstream_headers
from kvpilot.serving.router.state import RouterSettings, RouterState


def write(path, config: dict) -> None:
    path.write_text(yaml.safe_dump(config))


def config(endpoints: list[str], **extra) -> dict:
    return {"models": [{"name": "m", "revisions": [{"name": "r", "endpoints": endpoints}]}], **extra}


def test_upstream_key_is_read_from_its_file_and_sent_instead_of_the_tenant_key(tmp_path):
    (tmp_path / "upstream").write_text("server-key\n")
    write(tmp_path / "r.yaml", config(["http://a:1"], upstreamApiKeyFile=str(tmp_path / "upstream")))
    state = RouterState(RouterSettings(tmp_path / "r.yaml"))
    state.reload()
    assert _upstream_headers(state) == {
        "content-type": "application/json",
        "authorization": "Bearer server-key",
    }
    write(tmp_path / "r.yaml", config(["http://a:1"], upstreamApiKeyFile=str(tmp_path / "missing")))
    with pytest.raises(ConfigError, match="upstreamApiKeyFile: cannot read"):
        RouterState(RouterSettings(tmp_path / "r.yaml")).reload()


def test_reload_keeps_endpoint_state_and_a_bad_file_keeps_the_last_good_config(tmp_path):
    path = tmp_path / "r.yaml"
    write(path, config(["http://a:1", "http://b:1"]))
    state = RouterState(RouterSettings(path))
    state.reload()
    a = state.registry.get("http://a:1")
    a.in_flight, a.ready = 2, True
    assert not state.changed_on_disk()

    write(path, config(["http://a:1", "http://c:1"]))
    assert state.changed_on_disk() and state.reload()
    revision = state.loaded.table.models["m"].revisions[0]
    assert [e.url for e in revision.endpoints] == ["http://a:1", "http://c:1"] and revision.endpoints[0] is a
    assert set(state.registry.endpoints) == {"http://a:1", "http://c:1"}

    path.write_text("models: [")
    assert state.changed_on_disk() and not state.reload()
    assert [e.url for e in state.loaded.table.models["m"].revisions[0].endpoints] == [
        "http://a:1",
        "http://c:1",
    ]
    assert not state.changed_on_disk()  # the bad file is not retried until it changes again
    samples = {
        s.name + str(sorted(s.labels.items())): s.value
        for m in state.metrics.registry.collect()
        for s in m.samples
    }
    assert samples["kvpilot_router_config_reloads_total[('result', 'error')]"] == 1
    assert samples["kvpilot_router_config_reloads_total[('result', 'ok')]"] == 2
    assert samples["kvpilot_router_config_last_reload_successful[]"] == 0


def test_a_changed_key_file_is_a_change(tmp_path):
    (tmp_path / "key").write_text("old")
    write(
        tmp_path / "r.yaml", config(["http://a:1"], tenants=[{"name": "t", "keyFile": str(tmp_path / "key")}])
    )
    state = RouterState(RouterSettings(tmp_path / "r.yaml"))
    state.reload()
    assert state.loaded.tenants.authenticate("Bearer old") is not None
    (tmp_path / "key").write_text("new")  # a rotated Secret
    assert state.changed_on_disk() and state.reload()
    assert state.loaded.tenants.authenticate("Bearer old") is None
    assert state.loaded.tenants.authenticate("Bearer new").tenant.name == "t"


def test_the_command_exits_2_naming_the_field_of_a_bad_config(tmp_path, capsys):
    from kvpilot.serving.cli import main

    write(tmp_path / "r.yaml", {"models": [{"name": "m", "revisions": [{"name": "r", "weight": "heavy"}]}]})
    assert main(["router", "--config", str(tmp_path / "r.yaml")]) == 2
    assert (
        "kvpilot router: error: "
        + str(tmp_path / "r.yaml")
        + ": models[0].revisions[0].weight: Input should be a valid integer"
        in capsys.readouterr().err
    )
    assert main(["router", "--config", str(tmp_path / "absent.yaml")]) == 2
    assert "absent.yaml: cannot read" in capsys.readouterr().err
    assert main(["router", "--config", str(tmp_path / "r.yaml"), "--max-body-bytes", "0"]) == 2
    assert "--max-body-bytes: must be positive" in capsys.readouterr().err


def series(state: RouterState) -> set[tuple[str, tuple]]:
    return {
        (sample.name, tuple(sorted(sample.labels.items())))
        for family in state.metrics.registry.collect()
        for sample in family.samples
        if sample.labels
        and "config_reloads" not in sample.name
        and not sample.name.endswith(("_bucket", "_created", "_sum"))
    }


def test_a_reload_prunes_the_series_of_what_it_removed_gauges_once_at_zero(tmp_path):
    path = tmp_path / "r.yaml"
    models = [
        {"name": "m", "revisions": [{"name": "r", "endpoints": ["http://a:1", "http://b:1"]}, {"name": "s"}]},
        {"name": "gone", "revisions": [{"name": "r", "endpoints": ["http://a:1"]}]},
    ]
    tenants = [{"name": t, "keySha256": hashlib.sha256(t.encode()).hexdigest()} for t in ("t", "u")]
    write(path, {"models": models, "tenants": tenants})
    state = RouterState(RouterSettings(path))
    state.reload()
    m = state.metrics
    m.requests.labels("m", "r", "t", "200").inc()
    m.requests.labels("m", "s", "t", "200").inc()
    m.requests.labels("", "", "u", "401").inc()
    m.requests.labels("gone", "", "t", "503").inc()
    m.tokens.labels("m", "u", "prompt").inc(3)
    m.duration.labels("m", "s").observe(1)
    m.upstream_inflight.labels("m", "r", "http://a:1").set(0)
    m.upstream_inflight.labels("m", "r", "http://b:1").set(2)  # still in flight
    m.queued.labels("gone").set(0)

    models[0]["revisions"] = [{"name": "r", "endpoints": ["http://a:1"]}]  # s and http://b:1 leave
    write(path, {"models": models[:1], "tenants": tenants[:1]})  # so do model gone and tenant u
    assert state.reload()
    assert series(state) == {
        (
            "kvpilot_router_requests_total",
            (("code", "200"), ("model", "m"), ("revision", "r"), ("tenant", "t")),
        ),
        ("kvpilot_router_upstream_inflight", (("endpoint", "http://a:1"), ("model", "m"), ("revision", "r"))),
        ("kvpilot_router_upstream_inflight", (("endpoint", "http://b:1"), ("model", "m"), ("revision", "r"))),
    }
    m.upstream_inflight.labels("m", "r", "http://b:1").dec(2)  # the last request to b finished
    state.forget_if_gone(model="m", revision="r", endpoint="http://b:1")
    assert {name for name, labels in series(state) if ("endpoint", "http://b:1") in labels} == set()
    state.forget_if_gone(model="m", revision="r", endpoint="http://a:1")  # still configured: kept
    assert len(series(state)) == 2


def test_requests_held_for_a_model_a_reload_removes_are_woken_at_once(tmp_path):
    """They go on to answer 404 (open_upstream finds no model) instead of a 503 after the whole
    activation.timeout."""
    path = tmp_path / "r.yaml"
    write(path, config(["http://a:1"]))  # never probed ready: requests for m are held
    state = RouterState(RouterSettings(path))
    state.reload()

    async def scenario() -> bool:
        held = asyncio.create_task(state.activation.wait("m", timeout=30, max_queued=10))
        await asyncio.sleep(0)
        assert state.activation.held("m") == 1
        write(
            path, {"models": [{"name": "other", "revisions": [{"name": "r", "endpoints": ["http://b:1"]}]}]}
        )
        assert state.reload()
        state.release_held()  # what the app's config watcher does after a reload
        return await asyncio.wait_for(held, timeout=5)

    assert asyncio.run(scenario()) is True
    assert "m" not in state.loaded.table.models


def test_without_tenants_the_clients_authorization_goes_upstream_and_never_a_tenants(tmp_path):
    """Servers with their own --api-key behind a router without tenants: the client's key is for
    them (it was dropped: every request 401). With tenants the key is the tenant's, never sent."""
    write(tmp_path / "r.yaml", config(["http://a:1"]))
    state = RouterState(RouterSettings(tmp_path / "r.yaml"))
    state.reload()
    assert _upstream_headers(state, "Bearer client-key")["authorization"] == "Bearer client-key"
    assert "authorization" not in _upstream_headers(state)
    write(tmp_path / "r.yaml", config(["http://a:1"], tenants=[{"name": "t", "keySha256": "0" * 64}]))
    assert state.reload()
    assert "authorization" not in _upstream_headers(state, "Bearer tenant-key")


def test_the_request_id_goes_upstream(tmp_path):
    from kvpilot.serving.api.request_id import request_id_of

    write(tmp_path / "r.yaml", config(["http://a:1"]))
    state = RouterState(RouterSettings(tmp_path / "r.yaml"))
    state.reload()
    assert _upstream_headers(state, None, "trace-42")["x-request-id"] == "trace-42"
    assert request_id_of([(b"x-request-id", b"trace-42")]) == b"trace-42"
    assert len(request_id_of([(b"x-request-id", b"with space")])) == 32  # not passed on as given
    assert len(request_id_of([])) == 32
