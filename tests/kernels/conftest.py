"""The kernel tests need the optional triton package (the `test` extra installs it on Linux); where it
has no wheel (macOS, Windows) they are not collected and the rest of the suite still runs."""
import importlib.util

collect_ignore_glob = [] if importlib.util.find_spec("triton") is not None else ["test_*.py"]
