"""Run-level configs, presets and the command line.

Rule: builds and validates configs (typed dataclasses, every field with its rules) from presets,
saved files and ``key=value`` words, and nothing else; imports core/ for the sections the
networks and objectives own. A config is validated once, where it is built; everything after
trusts it.
"""
