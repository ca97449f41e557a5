"""``tidegate demo``: the real pipeline put through a scripted storm, then accounted for.

``stack`` starts the processes, ``storm`` drives the phases and the HTTP flood and samples the
system, ``accounting`` reconciles every job against the system's own records, ``report`` and
``charts`` write ``report.md`` and the PNGs. See docs/demo.md.
"""
