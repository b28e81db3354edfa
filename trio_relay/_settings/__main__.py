"""``python -m trio_relay._settings`` prints docs/operations.md's settings tables, to paste."""

from .settings import all_settings, markdown_table

for prefix in sorted({s.path[:-1] for s in all_settings()}):
    print(f"[{'.'.join(prefix)}]" if prefix else "(top level)")
    print(markdown_table(prefix), end="\n\n")
