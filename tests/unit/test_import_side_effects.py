"""Importing Tidegate builds no Celery app, reads no environment and leaves the user's app current.

Each check runs in a fresh interpreter: this test process has apps of its own already.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

from tidegate.stack import ROOT

GARBAGE = {
    "TIDEGATE_BROKER_URL": "nope://garbage",
    "TIDEGATE_REDIS_URL": "garbage",
    "TIDEGATE_POLICY_FILE": "/no/such/policy.toml",
    "TIDEGATE_CONNECT_TIMEOUT_S": "not-a-number",
    "TIDEGATE_APP": "no.such.module:app",
}


def _run(code: str, *flags: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GARBAGE, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code), str(ROOT)],
                          env=env,
                          capture_output=True, text=True, timeout=120, cwd=ROOT)


def test_importing_every_module_builds_no_app_and_reads_no_environment():
    result = _run("""
        import importlib, json, os, pkgutil, sys
        read = set()
        ours = tuple(os.path.join(sys.argv[1], p, "") for p in ("resilience", "workers",
                                                                "producers"))

        def by_us():
            # whether our code asked (a library's own import-time read, e.g. wsgiref's
            # copy of the environment, reaches an import machinery frame first)
            frame = sys._getframe(2)
            while frame is not None:
                name = frame.f_code.co_filename
                if name.startswith(ours):
                    return True
                if name.startswith("<frozen importlib"):
                    return False
                frame = frame.f_back
            return False

        class Spy(type(os.environ)):
            def __getitem__(self, key):
                if str(key).startswith("TIDEGATE_") and by_us():
                    read.add(key)
                return super().__getitem__(key)

            def __iter__(self):
                if by_us():
                    read.add("<iterated>")
                return super().__iter__()

        os.environ.__class__ = Spy
        import producers  # what `python -X importtime -c "import producers"` measures
        names = []
        for pkg in ("resilience", "workers", "producers"):
            module = importlib.import_module(pkg)
            for info in pkgutil.walk_packages(module.__path__, pkg + "."):
                importlib.import_module(info.name)
                names.append(info.name)
        import celery._state as state
        print(json.dumps({"apps": [a.main for a in state._apps], "modules": len(names),
                          "default": state.default_app is not None,
                          "current": getattr(state._tls, "current_app", None) is not None,
                          "read": sorted(read)}))
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["modules"] > 40  # every module under the three packages was imported
    assert seen == {**seen, "apps": [], "default": False, "current": False, "read": []}


def test_import_producers_under_importtime_imports_no_example_app():
    """The issue's own check: ``python -X importtime -c "import producers"``."""
    result = _run("import producers, celery._state as s; assert not list(s._apps)",
                  "-X", "importtime")
    assert result.returncode == 0, result.stderr[-2000:]
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert {"producers", "producers.producer", "workers.installation"} <= imported
    # building the example app would import its task modules
    assert not {n for n in imported if n.startswith(("workers.tasks", "workers.application"))}


def test_the_users_app_stays_current_and_eager():
    result = _run("""
        from celery import Celery, current_app

        user = Celery("userproj", set_as_current=True)
        user.conf.task_always_eager = True

        @user.task
        def add(x, y):
            return x + y

        import producers, producers.api, workers, workers.resilient, workers.replayer  # noqa
        import workers.tasks.payments, tidegate.cli  # noqa
        assert current_app._get_current_object() is user, current_app.main
        result = add.delay(2, 3)
        assert result.get(timeout=1) == 5, result
        print("ok", current_app.main)
    """)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["ok", "userproj"]


def test_a_user_app_with_resilient_tasks_but_no_tidegate_refuses_to_start_a_worker(tmp_path):
    """Its worker would run each Tidegate message into an error and ack it: lost. It stops at
    start-up instead, with one line saying what to call."""
    project = tmp_path / "plainproj"
    project.mkdir()
    (project / "__init__.py").write_text(textwrap.dedent("""
        from celery import Celery
        app = Celery("plainproj", broker="memory://", include=["plainproj.tasks"])
    """))
    (project / "tasks.py").write_text(textwrap.dedent("""
        from workers.resilient import resilient_task

        @resilient_task("search.lookup", dependency="search", idempotent=True)
        def lookup(self, q):
            return q
    """))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "celery"), "-A", "plainproj", "worker",
         "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last == ("tidegate: error: this Celery app ('plainproj') has no Tidegate installed; "
                    "call workers.install(app) first (docs/adopting.md)")


def test_a_worker_with_a_task_whose_dependency_is_not_in_the_policy_file_refuses_to_start(
        tmp_path):
    project = tmp_path / "typoproj"
    project.mkdir()
    (project / "__init__.py").write_text(textwrap.dedent("""
        from celery import Celery
        import workers
        from workers.settings import load_settings

        app = Celery("typoproj", include=["typoproj.tasks"])
        workers.install(app, load_settings(broker_url="memory://"))  # the shipped policy file
    """))
    (project / "tasks.py").write_text(textwrap.dedent("""
        from workers.resilient import resilient_task

        @resilient_task("inventory.reserve", dependency="inventory", idempotent=True)
        def reserve(self, sku):
            return sku
    """))
    env = {**os.environ, "PYTHONPATH": f"{ROOT}{os.pathsep}{tmp_path}"}
    env.pop("TIDEGATE_POLICY_FILE", None)
    result = subprocess.run(
        [os.path.join(os.path.dirname(sys.executable), "celery"), "-A", "typoproj", "worker",
         "-P", "solo", "--without-gossip", "--without-mingle", "--without-heartbeat"],
        env=env, capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("tidegate: error: task inventory.reserve: dependency 'inventory' "
                           "is not in the policy file ")
    assert last.endswith("(declared: email, payments, pricing, search)")
