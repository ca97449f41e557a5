"""workers.install on a user's Celery app: what it records, routes and refuses (no broker used)."""

from __future__ import annotations

import pytest
from celery import Celery

from resilience.errors import ConfigError
from workers.installation import NotInstalled, install, installation, load_app
from workers.settings import load_settings

SETTINGS = dict(broker_url="redis://127.0.0.1:1/0", redis_url="redis://127.0.0.1:1/1")


def _app(name: str = "userproj", **kw) -> Celery:
    return Celery(name, set_as_current=False, **kw)


def test_components_refuse_an_app_without_tidegate_in_one_line():
    from producers import Producer

    with pytest.raises(NotInstalled) as info:
        Producer(_app())
    assert str(info.value) == ("this Celery app ('userproj') has no Tidegate installed; call "
                               "workers.install(app) first (docs/adopting.md)")


def test_install_records_one_installation_and_refuses_a_second(tmp_path, monkeypatch):
    monkeypatch.delenv("TIDEGATE_BROKER_URL", raising=False)
    app = _app()
    found = install(app, load_settings(**SETTINGS))
    assert installation(app) is found
    assert found.settings.broker_url == app.conf.broker_url == SETTINGS["broker_url"]
    assert app.conf.task_serializer == "json" and app.conf.accept_content == ["json"]
    with pytest.raises(ConfigError, match="already installed"):
        install(app, load_settings(**SETTINGS))


def test_the_apps_own_broker_is_kept_and_a_different_env_broker_is_an_error(monkeypatch):
    monkeypatch.delenv("TIDEGATE_BROKER_URL", raising=False)
    monkeypatch.setenv("TIDEGATE_REDIS_URL", SETTINGS["redis_url"])
    app = _app(broker="redis://127.0.0.1:1/5")
    assert install(app).settings.broker_url == "redis://127.0.0.1:1/5"
    monkeypatch.setenv("TIDEGATE_BROKER_URL", "redis://127.0.0.1:1/6")
    with pytest.raises(ConfigError) as info:
        install(_app(broker="redis://user:secret@127.0.0.1:1/5"))
    assert "differ" in str(info.value) and "secret" not in str(info.value)


def test_routing_sends_matched_tasks_to_their_queue_and_leaves_the_rest_to_the_apps_routes():
    app = _app()
    app.conf.task_routes = {"reports.*": {"queue": "search"}}
    install(app, load_settings(**SETTINGS))
    route = app.amqp.router.route
    assert route({}, "payments.charge")["queue"].name == "payments"
    assert route({}, "reports.weekly")["queue"].name == "search"  # the app's own route
    assert route({}, "misc.thing")["queue"].name == "default"


def test_the_policy_files_app_include_joins_the_apps_own(tmp_path):
    from workers.settings import DEFAULT_POLICY_FILE

    policy = tmp_path / "policy.toml"
    policy.write_text('[app]\ninclude = ["shop.tasks"]\n\n' + DEFAULT_POLICY_FILE.read_text())
    app = _app(include=["mine.tasks"])
    install(app, load_settings(**SETTINGS, policy_file=policy))
    assert list(app.conf.include) == ["mine.tasks", "shop.tasks"]
    bare = _app()
    install(bare, load_settings(**SETTINGS))  # no [app] table: nothing added
    assert list(bare.conf.include or ()) == []


def test_load_app_names_what_it_could_not_load(monkeypatch):
    with pytest.raises(ConfigError, match="cannot load the Celery app 'no_such_mod:app'"):
        load_app("no_such_mod:app")
    monkeypatch.setenv("TIDEGATE_APP", "celery:Celery")
    with pytest.raises(NotInstalled):
        load_app()
